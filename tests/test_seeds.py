"""`mnist-seeds` and the presets it queues: the `-S` values DVC gets, and the mistakes it answers in one line
(tests/test_pipeline.py runs it for real, two seeds in a throw-away DVC repository)."""

import json
import re
import subprocess
import sys
import time
from datetime import datetime

import yaml

from mnist_pipeline import seeds
from mnist_pipeline.presets import BEST, PRESETS, set_options

# One experiment's data in `dvc exp show --json`: validation accuracy 0.99, test accuracy 0.98.
RECORD = {
    "metrics": {
        "metrics/train.json": {"data": {"val_accuracy": 0.99}},
        "metrics/eval.json": {"data": {"accuracy": 0.98}},
    }
}


def test_set_options_are_what_dvc_exp_run_s_parses_back_to_the_preset():
    options = set_options(BEST)
    assert "model.cnn.conv_channels=[16,48,96]" in options and "model.cnn.batch_norm=true" in options
    parsed = {}
    for option in options:
        key, value = option.split("=", 1)
        *groups, name = key.split(".")
        target = parsed
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = yaml.safe_load(value)
    assert parsed == BEST
    assert set_options(PRESETS["default"]) == []


def test_experiment_rows_finds_named_experiments_wherever_dvc_nests_them():
    record = RECORD
    shown = [
        {"rev": "workspace", "name": None, "data": {"metrics": {}}},
        {
            "rev": "abc",
            "name": "main",
            "data": {"metrics": {}},
            "experiments": [{"revs": [{"rev": "def", "name": "best-seed0-x", "data": record}], "name": "best-seed0-x"}],
        },
    ]
    rows = seeds.experiment_rows(shown, ["best-seed0-x"])
    assert list(rows) == ["best-seed0-x"]
    assert (
        seeds.metric(rows["best-seed0-x"], "val_accuracy") == 0.99
        and seeds.metric(rows["best-seed0-x"], "test accuracy") == 0.98
    )


def test_spread_is_mean_sample_sd_min_max_and_n():
    assert seeds.spread([0.99, 0.995]) == "mean 0.9925, sd 0.0035, min 0.9900, max 0.9950 (n=2)"


def test_an_unknown_preset_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.seeds", "--preset", "bset"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (
        result.returncode == 1 and result.stderr == "error: unknown preset 'bset': choose one of default, fast, best\n"
    )


def test_run_seconds_one_at_a_time_are_the_gaps_between_the_experiments_commits():
    from datetime import datetime

    rows = {"b": {"timestamp": "2026-12-05T07:00:52"}, "a": {"timestamp": "2026-12-05T06:58:43"}}
    started = datetime.fromisoformat("2026-12-05T06:56:02")
    assert seeds.run_seconds(rows, started, jobs=1) == {"a": 161.0, "b": 129.0}
    assert seeds.run_seconds(rows, started, jobs=2) == {"a": None, "b": None}, (
        "side by side, a run's own time is unknown"
    )


def test_a_worker_that_stopped_before_taking_the_seeds_is_started_again(monkeypatch, capsys):
    """DVC's worker stops once it finds the queue empty; one that did so just as the seeds were queued leaves them
    Queued with no worker, and mnist-seeds starts the workers again instead of waiting for ever."""
    statuses = iter(
        [
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Queued\n\nWorker status: 0 active, 0 idle\n",
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Running\n\nWorker status: 1 active, 0 idle\n",
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Success\n\nWorker status: 0 active, 0 idle\n",
        ]
    )
    calls = []

    def dvc(*args):
        calls.append(args)
        return next(statuses) if args == ("queue", "status") else ""

    monkeypatch.setattr(seeds, "dvc", dvc)
    monkeypatch.setattr(seeds, "start_workers", lambda jobs: calls.append(("queue", "start", "-j", str(jobs))))
    monkeypatch.setattr(seeds, "POLL_SECONDS", 0)
    monkeypatch.setattr(seeds, "STALLED_SECONDS", 0)
    seeds.wait(["default-seed0-x"], 1)
    assert calls.count(("queue", "start", "-j", "1")) == 2 and "default-seed0-x: success" in capsys.readouterr().out


def test_a_worker_still_registering_is_waited_for_not_doubled(monkeypatch, capsys):
    """A fresh worker is not yet counted as active for a while: starting another then ran two seeds side by side."""
    statuses = iter(
        [
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Queued\n\nWorker status: 0 active, 0 idle\n",
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Running\n\nWorker status: 0 active, 0 idle\n",
            "Task  Name  Created  Status\nabc  default-seed0-x  07:22  Success\n\nWorker status: 0 active, 0 idle\n",
        ]
    )
    started = []
    monkeypatch.setattr(seeds, "dvc", lambda *args: next(statuses))
    monkeypatch.setattr(seeds, "start_workers", started.append)
    monkeypatch.setattr(seeds, "POLL_SECONDS", 0)
    seeds.wait(["default-seed0-x"], 1)
    assert started == [1], "the workers are started once"
    assert "default-seed0-x: success" in capsys.readouterr().out


def test_starting_the_workers_returns_while_they_run(tmp_path, monkeypatch):
    """dvc queue start leaves its workers running, holding its output: mnist-seeds must not wait for them there."""
    fake = tmp_path / "dvc"
    fake.write_text("#!/bin/sh\necho starting a worker\nsleep 30 &\n")  # a worker that outlives the command
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    started = time.monotonic()
    seeds.start_workers(1)
    assert time.monotonic() - started < 10


def test_the_results_are_read_from_the_commit_the_runs_branched_from_though_head_moved_on(monkeypatch, capsys):
    """A commit made while the seeds run moves HEAD, whose experiments `dvc exp show` lists by default: the runs are
    read back from the commit they were queued on."""
    record = {"timestamp": "2026-12-06T04:05:00", **RECORD}
    shown = [
        {
            "rev": "queued-on",
            "experiments": [{"name": "best-seed0-x", "revs": [{"name": "best-seed0-x", "data": record}]}],
        }
    ]
    calls = []

    def dvc(*args):
        calls.append(args)
        return json.dumps(shown if args[-1] == "queued-on" else [])

    monkeypatch.setattr(seeds, "head_commit", lambda: "queued-on")
    monkeypatch.setattr(seeds, "queue", lambda preset, numbers, extra, run_id: ["best-seed0-x"])
    monkeypatch.setattr(seeds, "wait", lambda names, jobs: datetime.fromisoformat("2026-12-06T04:00:00"))
    monkeypatch.setattr(seeds, "dvc", dvc)
    seeds.run_seeds("best", 1, 0, 1, [])
    assert calls == [("exp", "show", "--json", "--rev", "queued-on"), ("queue", "logs", "best-seed0-x")]
    assert "test accuracy:  mean 0.9800" in capsys.readouterr().out


def test_a_run_restored_from_the_run_cache_is_flagged_and_its_seconds_are_left_out(monkeypatch, capsys):
    """Same params, data and code as an earlier run: DVC checks out that run's model in seconds. Its accuracy is the
    earlier run's, but its seconds are a checkout's, not a run's time."""
    record = RECORD
    rows = {"a": record, "b": record}
    seeds.report("best", [0, 1], ["a", "b"], {"a": 7.0, "b": 450.0}, rows, restored={"a"})
    out = capsys.readouterr().out
    assert re.search(r"^\s+0\s+a\s+0\.9900\s+0\.9800\s+7  restored from DVC's run-cache, not trained$", out, re.M), out
    assert "seconds:        mean 450, min 450, max 450 (n=1, each run with its set-up, one at a time; 1 restored" in out
    seeds.report("best", [0], ["a"], {"a": 7.0}, rows, restored={"a"})
    assert "none measured: every run was restored from DVC's run-cache" in capsys.readouterr().out
    seeds.report("best", [0, 1], ["a", "b"], {"a": None, "b": None}, rows, restored={"a"})
    assert "none measured" not in capsys.readouterr().out, "side by side, one restored run of two is not every run"

    logs = {
        "a": "Stage 'preprocess' didn't change, skipping\nStage 'train' is cached - skipping run, checking out",
        "b": "",
    }
    monkeypatch.setattr(seeds, "dvc", lambda *args: logs[args[-1]] if args[:2] == ("queue", "logs") else "")
    assert [seeds.restored_from_run_cache(name) for name in "ab"] == [True, False]
