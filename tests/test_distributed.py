"""Data-parallel training on the CPU, gloo on 127.0.0.1: two processes against one, a job of two torchrun "nodes",
what the workers share, a worker killed mid-run, and each fault of a launch in one line."""

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

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

from mnist_pipeline import distributed
from mnist_pipeline.distributed import CrossProcessBatchNorm, Worker, launch, planned_processes
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import load_params
from mnist_pipeline.prepared import load_meta
from stages import preprocess, train

# Nothing random but the data's order, so that 2 processes must reach what 1 does; batch norm, so that its
# statistics must be the global batch's.
EQUIVALENT = {
    **TINY_PARAMS,
    "model": {"cnn": {**TINY_PARAMS["model"]["cnn"], "batch_norm": True, "dropout": 0.0}},
    "train": {**TINY_PARAMS["train"], "epochs": 6, "shift_pixels": 0},
}


IP = shutil.which("ip") or "/usr/sbin/ip"  # iproute2's, for the namespaces of the 2-node test


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A working directory with EQUIVALENT params and data/prepared/, made by the preprocess stage."""
    work = tmp_path_factory.mktemp("prepared")
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    update_params(work / "params.yaml", EQUIVALENT)
    write_synthetic_mnist(work / "data/raw", train=400, test=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        preprocess.main([])
    return work


def copy_of(prepared: Path, target: Path, **train) -> Path:
    shutil.copytree(prepared, target)
    update_params(target / "params.yaml", {"train": train})
    return target


def trained(work: Path, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(command) or stage_command("train"), cwd=work, env=env or STAGE_ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result


def weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(work / "models/model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory) -> Path:
    work = copy_of(prepared, tmp_path_factory.mktemp("one") / "work", processes=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        train.main([])
    return work


@pytest.fixture(scope="module")
def two_processes(prepared, tmp_path_factory) -> tuple[Path, str]:
    """The stage with train.processes: 2, and what it printed."""
    work = copy_of(prepared, tmp_path_factory.mktemp("two") / "work", processes=2)
    return work, trained(work).stdout


def curve_of(work: Path, name: str) -> list[float]:
    lines = (work / f"metrics/train/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


def assert_same_weights(work: Path, reference: Path) -> None:
    ours, theirs = weights(work), weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(
            ours[name], theirs[name], atol=2e-5, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}"
        )


def test_two_processes_reach_the_weights_of_one_process(two_processes, one_process):
    work, printed = two_processes
    assert "training on cpu (2 processes of 1 CPU thread each)" in printed
    assert printed.count("kept epoch") == 1, "one writer"
    assert_same_weights(work, one_process)
    assert "running_var" in " ".join(weights(work)), "batch norm statistics, synchronised, are among them"
    for curve in ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]:
        ours, theirs = (curve_of(w, curve) for w in (work, one_process))
        assert len(ours) == EQUIVALENT["train"]["epochs"] and ours == pytest.approx(theirs, abs=1e-4), curve
    assert sorted(p.name for p in (work / "models").iterdir()) == ["model.pt"], "no training state or temp file left"


def two_node_torchrun(endpoint: str) -> list[str]:
    """torchrun for either node of a job of 2 nodes of one process each, its c10d rendezvous at `endpoint`: the same
    list, run id included, for both nodes."""
    launcher = str(Path(sys.executable).parent / "torchrun")
    return [launcher, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", uuid.uuid4().hex]  # fmt: skip


def test_two_torchrun_nodes_on_localhost_train_as_one_job(prepared, one_process, tmp_path):
    """What a 2-node job does, on one machine: each torchrun starts a worker, which joins the job and starts no more."""
    work = copy_of(prepared, tmp_path / "nodes", processes=1, threads=1)  # under torchrun, its --nproc-per-node counts
    torchrun = [*two_node_torchrun(f"127.0.0.1:{free_port()}"), "-m", "stages.train"]
    nodes = [
        subprocess.Popen(torchrun, cwd=work, env=STAGE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    printed = "".join(out for out, _ in outputs)
    assert printed.count("training on cpu (2 processes of 1 CPU thread each)") == 1 and printed.count("kept epoch") == 1
    assert_same_weights(work, one_process)


@pytest.fixture
def two_hosts() -> list[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair, as two machines on one link: (namespace, address, interface)
    of each; only their own loopback and the link, nothing that reaches beyond this machine. Skips where this
    process may not make namespaces (not root, or a container without CAP_SYS_ADMIN)."""
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"mnist-{tag}-{node}", f"10.213.0.{node + 1}", f"mn{tag}n{node}") for node in (0, 1)]  # names <= 15 chars
    if os.geteuid() != 0 or not Path(IP).exists():
        pytest.skip("making network namespaces needs root and iproute2's ip")
    made = []
    try:
        for namespace, _, _ in hosts:
            result = subprocess.run([IP, "netns", "add", namespace], capture_output=True, text=True)
            if result.returncode:
                pytest.skip(f"cannot make a network namespace here: {result.stderr.strip()}")
            made.append(namespace)
        (first, _, first_link), (second, _, second_link) = hosts
        commands = [
            [
                IP,
                "link",
                "add",
                first_link,
                "netns",
                first,
                "type",
                "veth",
                "peer",
                "name",
                second_link,
                "netns",
                second,
            ]
        ]
        for namespace, address, link in hosts:
            commands += [
                [IP, "-n", namespace, "addr", "add", f"{address}/24", "dev", link],
                [IP, "-n", namespace, "link", "set", link, "up"],
                [IP, "-n", namespace, "link", "set", "lo", "up"],
            ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield hosts
    finally:
        for namespace in made:  # the veth pair goes with them
            subprocess.run([IP, "netns", "delete", namespace], capture_output=True)


def test_two_nodes_on_their_own_addresses_train_as_one_process(prepared, one_process, two_hosts, tmp_path):
    """A 2-node job as on two machines: each node in its own network namespace with its own address and its own
    copy of the data, torchrun's rendezvous on the first node's address, gloo on the link between them."""
    (first, rendezvous, _), _ = two_hosts
    torchrun = [*two_node_torchrun(f"{rendezvous}:29400"), "--max-restarts", "0"]
    nodes = []
    for node, (namespace, address, link) in enumerate(two_hosts):
        work = copy_of(prepared, tmp_path / f"node{node}", processes=1, threads=1)
        command = [
            IP,
            "netns",
            "exec",
            namespace,
            *torchrun,
            "--local-addr",
            address,
            "--rdzv-conf",
            f"is_host={node == 0}",
            "-m",
            "stages.train",
        ]
        env = {
            **STAGE_ENV,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "GLOO_SOCKET_IFNAME": link,
            "MNIST_PIPELINE_RENDEZVOUS_TIMEOUT": "120",
        }
        nodes.append(
            (
                work,
                subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            )
        )
    outputs = [process.communicate(timeout=300) for _, process in nodes]
    assert [process.returncode for _, process in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    printed = "".join(out for out, _ in outputs)
    assert printed.count("training on cpu (2 processes of 1 CPU thread each)") == 1 and printed.count("kept epoch") == 1
    writers = [work for work, _ in nodes if (work / "models/model.pt").exists()]
    assert len(writers) == 1, "rank 0 writes the model, on its own node"
    assert_same_weights(writers[0], one_process)


def share_and_reduce(params, worker: Worker) -> None:
    """In each of 2 workers: every primitive the training loop uses, its results saved for the test to check."""
    rows = torch.arange(21.0).view(7, 3)  # 7 rows: 4 for rank 0, 3 for rank 1
    mine = worker.share(rows)
    torch.manual_seed(0)
    images, weights_of_outputs = torch.randn(6, 4, 5, 5) * 3 + 1, torch.randn(6, 4, 5, 5)
    norm = CrossProcessBatchNorm.like(torch.nn.BatchNorm2d(4, momentum=0.3))
    norm.weight.data.uniform_(0.5, 1.5)  # the same on both: seeded above
    pixels = worker.share(images).requires_grad_()
    normalised = norm(pixels)
    (normalised * worker.share(weights_of_outputs)).sum().backward()
    results = {
        "mine": mine,
        "gathered": worker.gather(mine * 10, len(rows)),
        "sum": worker.sum(torch.tensor([worker.rank + 1.0])),
        "first": worker.from_first(torch.tensor([worker.rank + 5.0])),
        "object": worker.object_from_first({"rank": worker.rank}),
        "objects": worker.gather_objects(worker.rank * 2),
        "normalised": normalised.detach(),
        "pixel_grad": pixels.grad,
        "weight_grad": norm.weight.grad,
        "running": (norm.running_mean, norm.running_var),
    }
    torch.save(results, f"worker{worker.rank}.pt")


def test_the_workers_share_rows_sums_and_batch_norm_statistics(prepared, tmp_path, monkeypatch):
    work = copy_of(prepared, tmp_path / "work")  # launch checks that each worker gets a share of its splits
    monkeypatch.chdir(work)
    params = load_params(prepared / "params.yaml")
    two = params.model_copy(update={"train": params.train.model_copy(update={"processes": 2})})
    launch(share_and_reduce, two, load_meta()["counts"])
    first, second = (torch.load(work / f"worker{rank}.pt", weights_only=True) for rank in (0, 1))
    rows = torch.arange(21.0).view(7, 3)
    assert torch.equal(first["mine"], rows[:4]) and torch.equal(second["mine"], rows[4:])
    assert torch.equal(first["gathered"], rows * 10) and torch.equal(second["gathered"], rows * 10)
    assert first["sum"].item() == second["sum"].item() == 3 and first["first"].item() == second["first"].item() == 5
    assert first["object"] == second["object"] == {"rank": 0}
    assert first["objects"] == [0, 2] and second["objects"] is None

    torch.manual_seed(0)  # one batch norm over the whole batch, as one process computes it
    images, weights_of_outputs = torch.randn(6, 4, 5, 5) * 3 + 1, torch.randn(6, 4, 5, 5)
    norm = torch.nn.BatchNorm2d(4, momentum=0.3)
    norm.weight.data.uniform_(0.5, 1.5)
    pixels = images.requires_grad_()
    normalised = norm(pixels)
    (normalised * weights_of_outputs).sum().backward()
    torch.testing.assert_close(torch.cat([first["normalised"], second["normalised"]]), normalised.detach())
    torch.testing.assert_close(torch.cat([first["pixel_grad"], second["pixel_grad"]]), pixels.grad)
    torch.testing.assert_close(
        first["weight_grad"] + second["weight_grad"], norm.weight.grad
    )  # DDP sums (averages) these
    for running in (first["running"], second["running"]):
        torch.testing.assert_close(running, (norm.running_mean, norm.running_var))


def test_a_worker_killed_mid_run_is_one_line_and_a_rerun_resumes_to_the_same_bytes(prepared, two_processes, tmp_path):
    uninterrupted, _ = two_processes
    work = copy_of(prepared, tmp_path / "killed", processes=2)
    state = work / "models/train_state.pt"
    stage = subprocess.Popen(
        stage_command("train"), cwd=work, env=STAGE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not state.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    children = Path(f"/proc/{stage.pid}/task/{stage.pid}/children").read_text().split()
    workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2, "two workers, started by the launcher (its resource tracker aside)"
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = stage.communicate(timeout=120)
    assert stage.returncode == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: training process rank ") and stderr.endswith(" of 2 was killed by SIGKILL\n")
    assert not (work / "models/model.pt").exists() and not list(work.rglob(".*.tmp")), "no output, not even a temp file"
    epochs_done = len(torch.load(state, weights_only=True)["history"])
    assert 1 <= epochs_done < EQUIVALENT["train"]["epochs"]

    resumed = trained(work)
    assert f"epochs 1-{epochs_done} of {EQUIVALENT['train']['epochs']} already done" in resumed.stdout
    for path in [
        "models/model.pt",
        "metrics/train.json",
        *[str(p.relative_to(uninterrupted)) for p in (uninterrupted / "metrics/train").rglob("*.*")],
    ]:
        assert (work / path).read_bytes() == (uninterrupted / path).read_bytes(), path
    assert not state.exists()


def alive(pid: int) -> bool:
    """Whether the process runs: not gone, and not a zombie waiting for a parent that no longer reaps it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["in the foreground", "as a background job"])
def test_killing_the_launcher_kills_its_workers(prepared, tmp_path, sigint):
    """kill -9 of the stage (or the OOM killer) gives its launcher no chance to stop the workers: the kernel does,
    also where the stage runs as a script's background job does, with SIGINT ignored."""
    work = copy_of(prepared, tmp_path / "orphans", processes=2, epochs=50)
    stage = subprocess.Popen(
        stage_command("train"),
        cwd=work,
        env=STAGE_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    deadline = time.monotonic() + 120
    while not (work / "models/train_state.pt").exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    children = Path(f"/proc/{stage.pid}/task/{stage.pid}/children").read_text().split()
    workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2 and all(map(alive, workers)), "two workers, training"
    stage.kill()
    stage.wait()
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers)), "the workers ended with their launcher"


def test_a_worker_that_fails_ends_the_stage_in_one_line_naming_its_rank(prepared, one_process, tmp_path):
    """Rank 0 writes the training state, and finds the disk full; the other worker is stopped, no output changes."""
    work = copy_of(one_process, tmp_path / "full", processes=2)
    before = {str(p): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    result = run_stage_cli("train", work, preexec_fn=full_disk, env={**STAGE_ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    assert_one_line_error(
        result,
        "rank 0 of 2: models/train_state.pt: file too large for the file system or for this process's file size limit",
    )
    assert {str(p): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("joining", [False, True], ids=["starting workers", "joining a job"])
def test_a_split_smaller_than_the_processes_is_one_line_before_any_worker_starts(prepared, tmp_path, joining):
    work = copy_of(prepared, tmp_path / "small", processes=2)
    update_params(work / "params.yaml", {"preprocess": {"val_size": 1}})
    run_stage_cli("preprocess", work)
    env = job_environment(free_port()) if joining else STAGE_ENV  # a worker checks before it waits for the others
    result = run_stage_cli("train", work, env=env)
    assert_one_line_error(
        result,
        ("rank 0 of 2: " if joining else "") + "the val split has 1 image, fewer than the 2 training "
        "processes, and each needs a share; expected train.processes <= 1, or a larger split (preprocess.val_size)",
    )
    assert not (work / "models").exists()


def job_environment(port: int, **more: str) -> dict:
    """A worker's environment as a job script that starts rank 0 of 2 by hand gives it."""
    return {
        **STAGE_ENV,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **more,
    }


def test_a_rendezvous_that_times_out_is_one_line(one_process):
    port = free_port()
    result = run_stage_cli("train", one_process, env=job_environment(port, MNIST_PIPELINE_RENDEZVOUS_TIMEOUT="2"))
    assert_one_line_error(
        result,
        f"rank 0 of 2: could not join the other training processes: the rendezvous at 127.0.0.1:{port} "
        "timed out after 2 s (MNIST_PIPELINE_RENDEZVOUS_TIMEOUT) waiting for 2 processes",
    )


@pytest.mark.parametrize("joining", [True, False], ids=["joining a job", "starting workers"])
def test_a_port_in_use_is_one_line(prepared, tmp_path, joining):
    work = copy_of(prepared, tmp_path / "work", processes=2)
    with socket.socket() as busy:  # listening, and never answering
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if joining:
            result = run_stage_cli("train", work, env=job_environment(port))
            start = "rank 0 of 2: could not join the other training processes"
        else:  # MASTER_PORT picks the port of the launch's rendezvous
            result = run_stage_cli("train", work, env={**STAGE_ENV, "MASTER_PORT": str(port)})
            start = "could not start 2 training processes"
    assert_one_line_error(result, f"{start}: port 127.0.0.1:{port} is in use by another program; choose a free port")
    assert not (work / "models").exists()


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True, None, "AUTO"])
def test_bad_values_of_train_processes_are_refused_in_one_line(workdir, value):
    update_params(workdir / "params.yaml", {"train": {"processes": value}})
    with pytest.raises(PipelineError) as refused:
        load_params()
    assert str(refused.value) == (
        f"params.yaml: train.processes = {value!r} is not allowed; "
        "expected an integer >= 1, or auto (one per visible GPU)"
    )


def test_auto_is_one_process_per_gpu_and_one_on_a_cpu(workdir, monkeypatch):
    update_params(workdir / "params.yaml", {"train": {"processes": "auto"}})
    params = load_params().train
    assert planned_processes(params, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert planned_processes(params, torch.device("cuda")) == 4


def test_more_processes_than_gpus_is_an_error_and_than_cores_a_warning(workdir, monkeypatch, capsys):
    update_params(workdir / "params.yaml", {"train": {"processes": 3}})
    params = load_params().train
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        PipelineError,
        match=r"^train.processes = 3 is more than the 2 GPUs PyTorch sees on this machine; "
        r"expected at most 2, or auto \(one process per GPU\)$",
    ):
        planned_processes(params, torch.device("cuda"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert planned_processes(params, torch.device("cpu")) == 3
    assert capsys.readouterr().err == (
        "warning: train.processes = 3 with 2 CPU cores: the processes take turns on the cores, "
        "and training is slower than with 2\n"
    )


def test_the_stage_launches_no_workers_when_it_already_is_one(monkeypatch):
    """Under torchrun (RANK and WORLD_SIZE set), train.processes is not read again: the job has its processes."""
    joined = []
    monkeypatch.setattr(distributed, "join_job", lambda worker_main, params, counts: joined.append(params))
    monkeypatch.setattr(distributed, "elastic_launch", lambda *args: pytest.fail("a worker started workers"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    launch(lambda params, worker: None, "params", {"train": 4, "val": 4})
    assert joined == ["params"]
