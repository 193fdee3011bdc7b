"""`mnist-seeds`: a preset trained over N seeds as DVC experiments, and the mean, spread and range of its accuracies.

It queues one experiment per seed (`dvc exp run --queue -S train.seed=K` plus the preset's `-S` values), runs the
queue (`dvc queue start`), waits for it, and reads every result back from `dvc exp show --json`: the experiments stay
in DVC, to compare (`make compare`), apply or push like any other. The workspace is left alone: queued experiments run
in temporary copies of the repository. Run one at a time (the default), each run's seconds are its wall time with its
set-up: from the end of the run before it (or the start of the queue) to the time DVC committed it as an experiment.
A seed whose params, data and code match an earlier run is restored from DVC's run-cache, not trained: its row says so,
and its seconds, the restore's, are left out of the time summary.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

from mnist_pipeline.cpu import this_cpu
from mnist_pipeline.errors import PipelineError, gist, run_stage
from mnist_pipeline.presets import PRESETS, set_options

METRICS = {"val_accuracy": ("metrics/train.json", "val_accuracy"), "test accuracy": ("metrics/eval.json", "accuracy")}
# Each `dvc queue status` costs about a CPU-second: polled every second, it took a quarter of a core from the runs it
# timed, on 2 cores about 25% longer epochs, and every 10 s still 9% of a core (top, on an AVX2-only AMD EPYC Milan).
# Every 30 s it costs 3%. The queue's worker starts each run itself, so a slower poll delays only the report, and
# the seconds reported come from DVC's commit times, not from when the poll noticed.
POLL_SECONDS = 30.0
# A new worker takes a while to register: until then `dvc queue status` says "0 active" with the seeds still queued.
# Starting another worker at once ran two seeds side by side, each epoch four times slower; only a queue seen stalled
# for this long has its workers started again.
STALLED_SECONDS = 60.0
ENDED = ("Success", "Failed")
# What `dvc exp run` logs when it checks out an earlier run's outputs instead of running the stage.
RESTORED_TRAINING = "Stage 'train' is cached"


def dvc(*args: str) -> str:
    """A dvc command's standard output; its failure becomes one line with the end of what it said."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines() or ["no output"]
        raise PipelineError(f"dvc {' '.join(args[:3])} failed: {said[-1]}")
    return result.stdout


def head_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"mnist-seeds runs in a git repository with a commit: {gist(result.stderr.strip())}")
    return result.stdout.strip()


def start_workers(jobs: int) -> None:
    """`dvc queue start -j jobs`. Its workers outlive it and keep the output they inherit: a pipe to read it through
    would stay open until the queue is done, so they write to a file instead."""
    with tempfile.TemporaryFile("w+") as said:
        result = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], stdout=said, stderr=said, text=True)
        if result.returncode != 0:
            said.seek(0)
            lines = said.read().strip().splitlines() or ["no output"]
            raise PipelineError(f"dvc queue start failed: {lines[-1]}")


def queue(preset: str, seeds: list[int], extra: list[str], run_id: str) -> list[str]:
    """One queued experiment per seed, named `<preset>-seed<K>-<run_id>`; their names, in seed order."""
    names = []
    for seed in seeds:
        name = f"{preset}-seed{seed}-{run_id}"
        options = [*set_options(PRESETS[preset]), *extra, f"train.seed={seed}"]
        dvc("exp", "run", "--queue", "-n", name, *(arg for option in options for arg in ("-S", option)))
        names.append(name)
    return names


def queue_states(status: str, names: list[str]) -> dict[str, str]:
    """The status `dvc queue status` printed for each of `names` (Queued, Running, Success, Failed); absent if none."""
    states = {}
    for line in status.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1] in names:
            states[words[1]] = words[-1]
    return states


def wait(names: list[str], jobs: int) -> datetime:
    """Start the queue's workers and wait until every experiment of `names` has ended; when the queue started."""
    started = datetime.now()
    start_workers(jobs)
    ended, stalled_since = set(), None
    while len(ended) < len(names):
        time.sleep(POLL_SECONDS)
        status = dvc("queue", "status")
        states = queue_states(status, names)
        if "Worker status: 0 active" in status and "Queued" in states.values() and "Running" not in states.values():
            # A worker can stop with ours still queued (seen after a sweep's `dvc queue stop --kill`, and a worker
            # that found the queue empty just before ours arrived): they would wait for ever. Start the workers again.
            if stalled_since is None:
                stalled_since = time.monotonic()
            if time.monotonic() - stalled_since >= STALLED_SECONDS:
                start_workers(jobs)
                stalled_since = None
        else:
            stalled_since = None
        for name, state in states.items():
            if state in ENDED and name not in ended:
                ended.add(name)
                print(f"{name}: {state.lower()}", flush=True)
                if state == "Failed":
                    raise PipelineError(
                        f"experiment {name} failed; `dvc queue logs {name}` shows why "
                        f"(the other seeds keep running: `dvc queue status`)"
                    )
    return started


def run_seconds(rows: dict[str, dict], started: datetime, jobs: int) -> dict[str, float | None]:
    """Each run's seconds, from the times DVC committed the experiments: one at a time, a run lasts from the end of
    the one before it (or the queue's start) to its own end, set-up included. Side by side, they are not known."""
    if jobs > 1:
        return dict.fromkeys(rows)
    seconds, previous = {}, started
    for name, data in sorted(rows.items(), key=lambda item: item[1]["timestamp"]):
        end = datetime.fromisoformat(data["timestamp"])
        seconds[name], previous = (end - previous).total_seconds(), end
    return seconds


def restored_from_run_cache(name: str) -> bool:
    """Whether DVC restored the experiment's model from its run-cache instead of training it: the params, data and
    code matched an earlier run's, so its seconds are a checkout's, not a run's."""
    return RESTORED_TRAINING in dvc("queue", "logs", name)


def experiment_rows(shown: list, names: list[str]) -> dict[str, dict]:
    """The records of the named experiments in `dvc exp show --json`'s output, found wherever they nest."""
    found = {}

    def visit(node) -> None:
        if isinstance(node, dict):
            if node.get("name") in names and isinstance(node.get("data"), dict) and node["data"].get("metrics"):
                found[node["name"]] = node["data"]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(shown)
    return found


def metric(data: dict, name: str) -> float:
    path, key = METRICS[name]
    return float(data["metrics"][path]["data"][key])


def spread(values: list[float]) -> str:
    """Mean, sample standard deviation, min and max of `values`, with n."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = statistics.mean(values)
    return f"mean {mean:.4f}, sd {sd:.4f}, min {min(values):.4f}, max {max(values):.4f} (n={len(values)})"


def report(
    preset: str,
    seeds: list[int],
    names: list[str],
    seconds: dict[str, float | None],
    rows: dict[str, dict],
    restored: set[str],
) -> None:
    print(f"\n{preset} preset over {len(seeds)} seeds on {this_cpu().describe()}")
    print(f"{'seed':>4}  {'experiment':<28} {'val_accuracy':>12} {'test accuracy':>13} {'seconds':>8}")
    for seed, name in zip(seeds, names, strict=True):
        shown = "-" if seconds[name] is None else f"{seconds[name]:.0f}"
        print(
            f"{seed:>4}  {name:<28} {metric(rows[name], 'val_accuracy'):>12.4f} "
            f"{metric(rows[name], 'test accuracy'):>13.4f} {shown:>8}"
            + ("  restored from DVC's run-cache, not trained" if name in restored else "")
        )
    for label in METRICS:
        print(f"{label + ':':<15} {spread([metric(rows[name], label) for name in names])}")
    times = [seconds[name] for name in names if seconds[name] is not None and name not in restored]
    left_out = f"; {len(restored)} restored left out" if restored else ""
    if times:
        print(
            f"{'seconds:':<15} mean {statistics.mean(times):.0f}, min {min(times):.0f}, max {max(times):.0f} "
            f"(n={len(times)}, each run with its set-up, one at a time{left_out})"
        )
    elif restored.issuperset(names):
        print(f"{'seconds:':<15} none measured: every run was restored from DVC's run-cache, not trained")


def run_seeds(preset: str, count: int, first_seed: int, jobs: int, extra: list[str]) -> None:
    if preset not in PRESETS:
        raise PipelineError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if count < 1 or jobs < 1:
        raise PipelineError(f"--seeds and --jobs must be at least 1, not {count} and {jobs}")
    seeds = list(range(first_seed, first_seed + count))
    # The runs branch from the commit checked out now; `dvc exp show` lists only HEAD's experiments by default, and
    # a commit made while they run would hide them.
    baseline = head_commit()
    names = queue(preset, seeds, extra, time.strftime("%m%d-%H%M%S"))
    print(f"queued {len(names)} experiments: {', '.join(names)}", flush=True)
    started = wait(names, jobs)
    try:
        shown = json.loads(dvc("exp", "show", "--json", "--rev", baseline))
    except json.JSONDecodeError as error:
        raise PipelineError(f"dvc exp show --json printed no JSON: {gist(error)}") from None
    rows = experiment_rows(shown, names)
    missing = [name for name in names if name not in rows]
    if missing:
        raise PipelineError(
            f"dvc exp show has no metrics for {', '.join(missing)}: `dvc queue logs NAME` shows what happened"
        )
    restored = {name for name in names if restored_from_run_cache(name)}
    report(preset, seeds, names, run_seconds(rows, started, jobs), rows, restored)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mnist-seeds",
        description="Train a preset over several seeds as queued DVC experiments, one after the other by default, and "
        "print each run's validation and test accuracy and seconds, then their mean, standard deviation, min and max. "
        "Run it in the repository, with the pipeline committed; the workspace is not changed.",
    )
    parser.add_argument(
        "--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: default, params.yaml as it is)"
    )
    parser.add_argument("-n", "--seeds", type=int, default=5, metavar="N", help="how many seeds (default: 5)")
    parser.add_argument(
        "--first-seed", type=int, default=0, metavar="K", help="train.seed of the first run (default: 0)"
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, help="runs at a time (default: 1, so that each run's time is its own)"
    )
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further params.yaml override for every run, as for dvc exp run -S (repeatable)",
    )
    args = parser.parse_args(argv)
    run_stage(lambda: run_seeds(args.preset, args.seeds, args.first_seed, args.jobs, args.set))


if __name__ == "__main__":
    main(sys.argv[1:])
