"""The training stage: augmentation, reproducible training on a small synthetic set, and resuming after a crash."""

import functools
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    REPO_ROOT,
    STAGE_ENV,
    TINY_PARAMS,
    assert_one_line_error,
    run_stage_cli,
    stage_command,
    update_params,
    write_synthetic_mnist,
)

from mnist_pipeline import augment, paths, resume, training
from mnist_pipeline import device as device_module
from mnist_pipeline import model as model_module
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.distributed import Worker
from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.prepared import load_split
from stages import preprocess, train

RESUME_FILE = train.resume_file_of(paths.MODEL_FILE)  # the train stage's, by default


def test_random_shift_moves_each_image_by_at_most_the_limit():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 14, 14] = 255
    shifted = augment.random_shift(pixels, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == pixels.shape and shifted.dtype == torch.uint8
    rows, cols = (shifted[:, 0] == 255).nonzero()[:, 1], (shifted[:, 0] == 255).nonzero()[:, 2]
    assert len(rows) == 64, "each image keeps its one bright pixel"
    assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10, "offsets differ between images"


def test_random_shift_fills_with_black_and_never_flips():
    pixels = torch.arange(28 * 28, dtype=torch.int64).reshape(1, 1, 28, 28).remainder(250).add(1).to(torch.uint8)
    for seed in range(20):
        shifted = augment.random_shift(pixels, 3, torch.Generator().manual_seed(seed))[0, 0]
        inside = shifted[3:-3, 3:-3]  # always inside the source image, whatever the offset
        found = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.equal(inside, pixels[0, 0, 3 + dy : 25 + dy, 3 + dx : 25 + dx])
        ]
        assert len(found) == 1, "the result is the source translated, not mirrored or rotated"
        assert (shifted == 0).any() or found == [(0, 0)]


def test_with_ema_decay_the_stage_keeps_the_moving_average_that_validation_scored(workdir):
    """train.ema_decay: validation scores the weights' moving average, and that average is what model.pt holds."""
    update_params(workdir / "params.yaml", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "ema_decay": 0.9}})
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    train.main([])
    averaged, checkpoint = load_checkpoint(paths.MODEL_FILE)
    images, labels = load_split("val")
    logits = device_module.predict_logits(averaged, torch.from_numpy(images).unsqueeze(1), 1000)
    assert (logits.argmax(1).numpy() == labels).mean() == pytest.approx(checkpoint["val_accuracy"], abs=1e-6)

    update_params(workdir / "params.yaml", {"train": {"ema_decay": 0.0}})
    train.main([])
    trained, _ = load_checkpoint(paths.MODEL_FILE)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(averaged.state_dict().values(), trained.state_dict().values(), strict=True)
    ), "the average is not the trained weights"


def test_the_moving_average_weighs_every_steps_weights_by_decay_to_their_age():
    """train.ema_decay's average is the decay-weighted mean of all the steps' weights, not a plain EMA that starts
    as the first step's weights; batch norm's batch count is the latest."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    decay, steps = 0.9, [3.0, -1.0, 7.0, 2.0, 5.0]
    averaged = training.moving_average(model, decay)
    for step, value in enumerate(steps, 1):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked.fill_(step)
        averaged.update_parameters(model)
    ages = torch.arange(len(steps) - 1, -1, -1, dtype=torch.float64)
    expected = (decay**ages * torch.tensor(steps, dtype=torch.float64)).sum() / (decay**ages).sum()
    assert averaged.module[0].weight.detach().flatten().tolist() == pytest.approx([expected.item()] * 2, rel=1e-6)
    assert averaged.module[1].num_batches_tracked.item() == len(steps)


def test_training_is_reproducible_and_keeps_the_best_epoch(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    train.main([])
    first_bytes = (workdir / "models/model.pt").read_bytes()
    first = torch.load(workdir / "models/model.pt", weights_only=True)
    summary = json.loads((workdir / "metrics/train/metrics.json").read_text())
    train.main([])
    assert (workdir / "models/model.pt").read_bytes() == first_bytes, "same params, same bytes: DVC sees no change"
    assert summary["kept"]["epoch"] == first["epoch"] and summary["kept"]["val_accuracy"] == pytest.approx(
        first["val_accuracy"], abs=1e-6
    )
    assert json.loads((workdir / paths.TRAIN_METRICS).read_text()) == {"val_accuracy": summary["kept"]["val_accuracy"]}
    curve = (workdir / "metrics/train/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    assert len(curve) == 1 + TINY_PARAMS["train"]["epochs"]
    best_from_curve = max(float(line.split("\t")[1]) for line in curve[1:])
    assert first["val_accuracy"] == pytest.approx(best_from_curve, abs=1e-6)


@pytest.mark.parametrize("keep, kept_epoch", [("best", 1), ("last", 3)])
def test_train_keep_picks_the_best_validated_epoch_or_the_last(workdir, monkeypatch, keep, kept_epoch):
    """Validation made to get worse every epoch (0.9, 0.8, 0.7): `best` keeps the first, `last` the third."""
    update_params(workdir / "params.yaml", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "keep": keep}})
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    scores = iter([0.9, 0.8, 0.7])
    monkeypatch.setattr(train, "evaluate", lambda *args: (0.5, next(scores)))
    train.main([])
    kept = torch.load(workdir / "models/model.pt", weights_only=True)
    assert (kept["epoch"], kept["val_accuracy"]) == (kept_epoch, pytest.approx(1 - kept_epoch / 10))
    summary = json.loads((workdir / "metrics/train/metrics.json").read_text())
    assert summary["kept"]["epoch"] == kept_epoch


def test_zero_rotation_and_zoom_is_the_identity():
    pixels = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    rotated = augment.random_warp(pixels, 0, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotated, pixels.float(), atol=1e-3, rtol=0)


def test_rotation_stays_within_the_limit_and_varies_between_images():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 14, 4:24] = 255  # a horizontal bar through the centre, 20 pixels long
    rotated = augment.random_warp(pixels, 10, 0, torch.Generator().manual_seed(0))
    assert rotated.dtype == torch.float32 and rotated.min() >= 0 and rotated.max() <= 255
    rows = [(image[0] > 100).nonzero()[:, 0] for image in rotated]
    # 10 pixels from the centre, a 10° turn moves the bar's end by 10·sin(10°) ≈ 1.7 rows
    assert all(r.min() >= 14 - 3 and r.max() <= 14 + 3 for r in rows)
    spreads = {int(r.max() - r.min()) for r in rows}
    assert len(spreads) > 1, "angles differ between images"


def test_zoom_scales_about_the_centre_within_the_limit():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 4:24, 4:24] = 255  # a 20-pixel square
    zoomed = augment.random_warp(pixels, 0, 0.2, torch.Generator().manual_seed(0))
    sides = [(image[0, 14] > 127).sum().item() for image in zoomed]
    assert min(sides) >= 20 * 0.8 - 1 and max(sides) <= 20 * 1.2 + 1
    assert min(sides) < 19 and max(sides) > 21, "both zooming in and zooming out happen"


def test_elastic_displacements_move_pixels_as_far_as_asked_smoothly_and_differently_per_image():
    displacements = augment.elastic_displacements(256, 28, 28, 2.0, 4, torch.Generator().manual_seed(0), "cpu")
    assert displacements.shape == (256, 28, 28, 2)
    rms = displacements.square().mean(dim=(0, 1, 2)).sqrt()
    torch.testing.assert_close(rms, torch.tensor([2.0, 2.0]), atol=0.1, rtol=0)  # along x and along y
    neighbours = (displacements[:, :, 1:] - displacements[:, :, :-1]).square().mean().sqrt()
    assert neighbours < 0.25 * 2.0, "a smooth field: next-door pixels move nearly alike"
    assert (displacements[0] - displacements[1]).abs().mean() > 1.0, "each image bends its own way"


def test_elastic_distortion_bends_a_stroke_without_breaking_or_moving_it_far():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 4:24, 12:16] = 255  # a vertical bar, 4 pixels wide, columns 12 to 15
    bent = augment.random_warp(pixels, 0, 0, torch.Generator().manual_seed(0), elastic_pixels=1.0, elastic_sigma=4)
    assert bent.dtype == torch.float32 and bent.min() >= 0
    assert bent.max() <= 255 + 1e-3, "bilinear weights sum to 1, up to rounding"
    rows = bent[:, 0, 9:19]  # 5 rows from the bar's ends: they may move up or down
    assert (rows.amax(2) > 127).all(), "the bar is bent, never broken"
    centres = (rows * torch.arange(28.0)).sum(2) / rows.sum(2)  # where each row meets the bar
    assert ((centres - 13.5).abs() <= 5).all(), "pixels move a few pixels at most"
    assert centres.std(1).min() > 0.05, "each bar bends, not only moves"
    assert len({tuple(c.round().tolist()) for c in centres}) > 32, "the bends differ between images"


def test_elastic_distortion_alone_is_augmentation():
    params = load_params(REPO_ROOT / "params.yaml").train
    plain = params.model_copy(update={"shift_pixels": 0, "rotate_degrees": 0, "zoom_percent": 0, "elastic_pixels": 0})
    assert not augment.augments(plain)
    assert augment.augments(plain.model_copy(update={"elastic_pixels": 1.0}))


RESUMABLE_PARAMS = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 6}}


def prepared_workdir(root, name: str):
    """A working directory with params.yaml and data/prepared/ for RESUMABLE_PARAMS, built by the stages."""
    work = root / name
    (work / "data").mkdir(parents=True)
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    update_params(work / "params.yaml", RESUMABLE_PARAMS)
    write_synthetic_mnist(work / "data/raw", train=2000, test=100)
    assert run_stage_cli("preprocess", work).returncode == 0
    return work


def train_outputs(work) -> dict:
    """Every file the train stage writes, as bytes."""
    files = [work / "models/model.pt", *sorted((work / "metrics/train").rglob("*.*"))]
    return {str(f.relative_to(work)): f.read_bytes() for f in files}


def test_a_run_killed_mid_training_resumes_to_the_same_bytes(tmp_path):
    uninterrupted = prepared_workdir(tmp_path, "uninterrupted")
    assert run_stage_cli("train", uninterrupted).returncode == 0
    assert not (uninterrupted / RESUME_FILE).exists(), "a finished run leaves no training state behind"

    work = prepared_workdir(tmp_path, "killed")
    state = work / RESUME_FILE
    process = subprocess.Popen(
        stage_command("train"), cwd=work, env=STAGE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "killed before training finished"
    assert not (work / "models/model.pt").exists(), "no model, rather than half a model"
    epochs_done = len(torch.load(state, weights_only=True)["history"])
    assert 1 <= epochs_done < RESUMABLE_PARAMS["train"]["epochs"]

    resumed = run_stage_cli("train", work)
    assert resumed.returncode == 0, resumed.stderr
    assert f"epochs 1-{epochs_done} of 6 already done" in resumed.stdout
    assert train_outputs(work) == train_outputs(uninterrupted), "model weights and every metric identical"
    assert not state.exists() and not list((work / "models").glob(".*.tmp"))


def test_temp_files_of_a_killed_run_are_gone_after_the_next(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    stale = [workdir / "models/.model.pt.k1ll3d.tmp", workdir / "models/.train_state.pt.k1ll3d.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    train.main([])
    assert not any(path.exists() for path in stale)


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Make Ctrl-C arrive during the given epoch's validation, after the previous epoch's state was saved."""
    evaluate, calls = train.evaluate, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(train, "evaluate", interrupted)


@pytest.fixture
def resumable_workdir(workdir):
    update_params(workdir / "params.yaml", RESUMABLE_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    return workdir


def test_ctrl_c_stops_in_one_line_and_a_rerun_resumes_from_the_last_epoch(resumable_workdir, monkeypatch, capsys):
    train.main([])
    uninterrupted = train_outputs(resumable_workdir)

    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, 3)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run_stage(lambda: train.main([]))
    assert stop.value.code == 130
    assert capsys.readouterr().err == (
        f"interrupted: training stopped; run it again with the same params to resume from {RESUME_FILE}\n"
    )

    train.main([])
    assert "epochs 1-2 of 6 already done" in capsys.readouterr().out
    assert train_outputs(resumable_workdir) == uninterrupted


def test_a_training_state_from_other_params_or_damaged_is_reported_and_not_resumed(
    resumable_workdir, monkeypatch, capsys
):
    train.main([])
    fresh = train_outputs(resumable_workdir)

    update_params(resumable_workdir / "params.yaml", {"train": {"lr": 0.02}})
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_in_epoch(patch, 3)
        train.main([])
    update_params(resumable_workdir / "params.yaml", {"train": {"lr": RESUMABLE_PARAMS["train"]["lr"]}})
    capsys.readouterr()
    train.main([])
    assert "comes from a run with other params; starting from epoch 1" in capsys.readouterr().out
    assert train_outputs(resumable_workdir) == fresh

    (resumable_workdir / RESUME_FILE).write_bytes(b"not a checkpoint")
    train.main([])
    assert "not a readable training state" in capsys.readouterr().out
    assert train_outputs(resumable_workdir) == fresh


@pytest.mark.slow
def test_a_compiled_model_trains_and_saves_the_plain_model(workdir):
    update_params(
        workdir / "params.yaml", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1, "compile": True}}
    )
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    train.main([])
    model, _ = load_checkpoint(workdir / "models/model.pt")  # no torch.compile wrapper names in the weights
    assert model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 10)


def test_the_training_loop_reads_from_the_device_once_per_epoch_not_once_per_step(workdir, monkeypatch):
    """On CUDA each read of a tensor's value waits for the GPU; the loop must queue whole epochs of steps."""
    update_params(workdir / "params.yaml", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "batch_size": 16}})
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    params = load_params()
    reads = []
    for method in ["item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"]:
        original = getattr(torch.Tensor, method)

        def counted(tensor, *args, original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller in (
                train.__file__,
                training.__file__,
                resume.__file__,
                model_module.__file__,
                device_module.__file__,
            ):
                reads.append(caller)
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    train.train(params, Worker(torch.device("cpu")), lambda result, model: None)
    steps_per_epoch = -(-340 // 16)
    assert steps_per_epoch > 20
    assert 0 < len(reads) <= 6 * params.train.epochs, "a handful of reads per epoch (its totals and validation)"


def interrupted_state(workdir, monkeypatch) -> dict:
    """The training state a run leaves when Ctrl-C stops it in its third epoch, loaded."""
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_in_epoch(patch, 3)
        train.main([])
    return torch.load(workdir / RESUME_FILE, weights_only=True)


def test_a_training_state_from_another_device_is_reported_and_not_resumed(resumable_workdir, monkeypatch, capsys):
    """A CPU's random generator state would crash a CUDA generator, and the other way round: a state saved on
    another device starts a fresh run, which then replaces the file."""
    train.main([])
    fresh = train_outputs(resumable_workdir)
    state = interrupted_state(resumable_workdir, monkeypatch)
    assert state["origin"]["device"] == "cpu"
    state["origin"]["device"] = "cuda"
    torch.save(state, resumable_workdir / RESUME_FILE)
    capsys.readouterr()
    train.main([])
    output = capsys.readouterr().out
    assert f"ignoring {RESUME_FILE}: it comes from a run with device cuda, not cpu; starting from epoch 1\n" in output
    assert "resuming" not in output and train_outputs(resumable_workdir) == fresh


def test_a_training_state_saved_by_other_code_is_reported_and_not_resumed(resumable_workdir, monkeypatch, capsys):
    """Kill training, edit the code, rerun: dvc.lock records the new code, so the epochs must be the new code's."""
    train.main([])
    fresh = train_outputs(resumable_workdir)
    interrupted_state(resumable_workdir, monkeypatch)
    monkeypatch.setattr(resume, "code_digest", lambda files: "the digest of edited code")
    capsys.readouterr()
    train.main([])
    assert "comes from a run with other code; starting from epoch 1" in capsys.readouterr().out
    assert train_outputs(resumable_workdir) == fresh


def test_the_code_digest_covers_the_given_files_and_the_package(tmp_path):
    stage = tmp_path / "train.py"
    stage.write_text("print('one')\n")
    before = resume.code_digest([stage])
    stage.write_text("print('two')\n")
    assert resume.code_digest([stage]) != before
    assert resume.code_digest([]) != resume.code_digest([stage])


def test_a_one_cycle_schedule_too_short_to_warm_up_is_one_line_before_training(workdir):
    update_params(
        workdir / "params.yaml", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1, "batch_size": 256}}
    )
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    assert_one_line_error(
        run_stage_cli("train", workdir), "train.lr_schedule = onecycle needs more than 1 step of warm-up"
    )


def test_compiling_before_the_first_epoch_leaves_no_trace_in_training(workdir):
    """The trial steps that make torch.compile compile up front are undone: weights, optimiser, random draws."""
    update_params(
        workdir / "params.yaml", {**TINY_PARAMS, "model": {"cnn": {**TINY_PARAMS["model"]["cnn"], "dropout": 0.3}}}
    )
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    params = load_params()
    run = training.prepare(params, Worker(torch.device("cpu")), paths.PREPARED_DIR, paths.PRETRAINED_DIR)
    step = functools.partial(training.training_step, run, params.train)
    step(torch.arange(32))  # an optimiser with state, as after a resume
    weights = {name: tensor.clone() for name, tensor in run.model.state_dict().items()}
    moments = [value.clone() for state in run.optimizer.state.values() for value in state.values()]
    rng = training.rng_states(run.generator, run.device)

    assert training.compile_now(step, run, {32, 20}) > 0
    assert all(torch.equal(tensor, weights[name]) for name, tensor in run.model.state_dict().items())
    assert all(
        torch.equal(value, moment)
        for value, moment in zip((v for s in run.optimizer.state.values() for v in s.values()), moments, strict=True)
    )
    after = training.rng_states(run.generator, run.device)
    assert torch.equal(after["generator"], rng["generator"]) and torch.equal(after["torch"], rng["torch"])
