"""Kill a real tuning run with SIGKILL mid-study, resume it, and check nothing was lost.

    python benchmarks/kill_resume.py [--tokens 1,64,1024] [--after 40] [--out result.json]

Starts ``python -m autotune --arch sm90`` (Nemotron 3 Super preset) with a fresh journal
(``--storage``; kernels come from the usual cache), waits until ``--after`` trials are
stored, kills it (no cleanup: the trial in flight stays RUNNING), reruns the same command to
the end, and checks that every trial completed before the kill is still there with its time,
that no config was evaluated twice in a study, and that the rerun finished. Needs the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState


def _completed(journal: Path) -> dict[tuple[str, int], tuple[float, str, str | None]]:
    """(study, trial number) -> (value, config, order) of every evaluated trial."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            out[(summary.study_name, t.number)] = (t.value, t.user_attrs.get("config"),
                                                   t.user_attrs.get("order"))
    return out


def _running(journal: Path) -> int:
    storage = JournalStorage(JournalFileBackend(str(journal)))
    return sum(len(optuna.load_study(study_name=s.study_name, storage=storage)
                   .get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
               for s in optuna.get_all_study_summaries(storage))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,64,1024")
    p.add_argument("--after", type=int, default=40, help="stored trials before the kill")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    journal = Path(tempfile.mkdtemp(prefix="autotune-kill-")) / "studies.journal"
    cmd = [sys.executable, "-m", "autotune", "--arch", "sm90", "--tokens", args.tokens,
           "--storage", str(journal)]
    env = dict(os.environ)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before: dict = {}
    while proc.poll() is None:
        time.sleep(0.5)
        if journal.exists():
            before = _completed(journal)
            if len(before) >= args.after:
                break
    if proc.poll() is not None:
        print(f"the run ended (rc {proc.returncode}) before {args.after} trials; nothing killed")
        return 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic() - start
    before = _completed(journal)
    stranded = _running(journal)
    resume = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = _completed(journal)
    lost = [k for k, v in before.items() if after.get(k) != v]
    twice = []
    storage = JournalStorage(JournalFileBackend(str(journal)))
    for s in optuna.get_all_study_summaries(storage):
        done = [(t.user_attrs.get("config"), t.user_attrs.get("order"))
                for t in optuna.load_study(study_name=s.study_name, storage=storage)
                .get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        twice += [(s.study_name, c) for c in set(done) if done.count(c) > 1]
    result = {"tokens": args.tokens, "killed_after_s": round(killed_at, 1),
              "completed_before_kill": len(before), "running_at_kill": stranded,
              "completed_after_resume": len(after), "lost": len(lost),
              "evaluated_twice": len(twice), "resume_rc": resume.returncode,
              "resume_tail": resume.stdout[-3000:]}
    print(json.dumps({k: v for k, v in result.items() if k != "resume_tail"}, indent=1))
    print(resume.stdout[-3000:])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if resume.returncode == 0 and not lost and not twice else 1


if __name__ == "__main__":
    sys.exit(main())
