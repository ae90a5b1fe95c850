"""Two gloo processes on CPU: DDP with shuffle-BN, all-gathered keys, identical replicas.

Starting two processes that import torch and the engine takes most of the time of such a test (~10 s on 2
cores), so the two ranks are spawned once for the module: each runs the shuffle round trip, then both
trainings (plain BN, split BN), each part in a process group of its own on a port of its own, and leaves its
reports in the part's folder; the tests read them. A part that raises stops both ranks (mp.spawn), and every
test of the module errors with its traceback."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from densecl.data.settings import DataConfig
from densecl.distributed import DistEnv
from densecl.method.settings import BackboneConfig
from densecl.training.pretrain import prepare_device
from densecl.training.settings import PretrainConfig, TrainingConfig

pytestmark = pytest.mark.xdist_group("ddp")  # under pytest-xdist, the module's tests in one worker: one spawn

BN_SPLITS = (1, 2)  # 2: split BN inside each rank as well as shuffle-BN across them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank(rank: int, world: int, port: int, report_dir: str, bn_splits: int = 1) -> None:
    """A 3-step pre-training into report_dir/run; the model's final state and whether each step's key batch
    was shuffled across the ranks go to report_dir/rank<rank>.pt."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import densecl.method.model as model_module
    import densecl.training.pretrain as engine

    built, shuffles = [], []
    build_model, shuffle_batch = engine.build_model, model_module.shuffle_batch

    def capture_model(cfg, env, device):
        built.append(build_model(cfg, env, device))
        return built[-1]

    def counting_shuffle(x, local=False):
        shuffled, unshuffle = shuffle_batch(x, local)
        shuffles.append(unshuffle is not None and not torch.equal(shuffled, x))
        return shuffled, unshuffle

    engine.build_model = capture_model
    model_module.shuffle_batch = counting_shuffle
    cfg = PretrainConfig(
        backbone=BackboneConfig(arch="resnet18"),
        data=DataConfig(kind="synthetic", num_images=32, image_size=64),
        pretrain=TrainingConfig(crop_size=64, batch_size=4, queue_len=16, iters=3, epochs=None, num_workers=0,
                                progress=False, ckpt_every=100, log_every=1, bn_splits=bn_splits),
        device="cpu",
    )
    try:
        result = engine.pretrain(cfg, os.path.join(report_dir, "run"))
    finally:  # the next part starts from the engine as it is
        engine.build_model, model_module.shuffle_batch = build_model, shuffle_batch
    model = built[0]
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "shuffled": shuffles,
            "completed": result.completed,
        },
        os.path.join(report_dir, f"rank{rank}.pt"),
    )


def shuffle_round_trip(rank: int, world: int, port: int, report_dir: str) -> None:
    import torch.distributed as dist

    from densecl.distributed import shuffle_batch, unshuffle_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # the ranks draw different permutations: rank 0's is the one broadcast
        images = (torch.arange(8) + 8 * rank).float().view(8, 1)  # each image carries its global id
        shuffled, unshuffle = shuffle_batch(images)
        keys = unshuffle_batch(shuffled * 1.0, unshuffle)  # an "encoder" that keeps each input's id
        torch.save({"shuffled": shuffled, "keys": keys}, os.path.join(report_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


PARTS = {"round_trip": shuffle_round_trip} | {
    f"bn_splits={g}": lambda rank, world, port, report_dir, g=g: train_rank(rank, world, port, report_dir, g)
    for g in BN_SPLITS
}


def run_parts(rank: int, world: int, ports: list[int], root: str) -> None:
    """One rank: every part in turn, each with its own port, into root/<part>/."""
    torch.set_num_threads(1)
    for (name, part), port in zip(PARTS.items(), ports, strict=True):
        report_dir = os.path.join(root, name)
        os.makedirs(report_dir, exist_ok=True)
        part(rank, world, port, report_dir)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder of every part's reports, from two ranks spawned once."""
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(run_parts, args=(2, [free_port() for _ in PARTS], str(root)), nprocs=2, join=True)
    return root


def reports(root, part: str) -> list[dict]:
    return [torch.load(root / part / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("bn_splits", BN_SPLITS)
def test_two_gloo_processes_train_in_lockstep_with_shuffle_bn(two_ranks, bn_splits):
    r0, r1 = reports(two_ranks, f"bn_splits={bn_splits}")
    out = two_ranks / f"bn_splits={bn_splits}" / "run"
    assert r0["completed"] and r1["completed"]
    assert len(r0["shuffled"]) == 3 and all(r0["shuffled"])  # the key batch really was redistributed
    for key, value in r0["state"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BN statistics are per-rank by design (plain BN)
        assert torch.equal(value, r1["state"][key]), key
    # keys from both ranks were all-gathered: 3 steps x global batch 8 into a queue of 16
    assert int(r0["state"]["queue_global_ptr"]) == (3 * 8) % 16
    assert (out / "checkpoint.pt").exists() and (out / "backbone.pth").exists()


def test_sync_bn_on_cpu_is_a_clear_error():
    cfg = PretrainConfig(pretrain=TrainingConfig(sync_bn=True))
    cpu = torch.device("cpu")
    assert prepare_device(cfg, DistEnv(0, 1, 0), cpu) == cpu  # one process: plain BN, nothing to synchronise
    with pytest.raises(ValueError, match="pretrain.sync_bn=true needs CUDA"):
        prepare_device(cfg, DistEnv(0, 2, 0), cpu)


@pytest.mark.slow
def test_keys_come_back_to_their_own_rank_and_row_across_two_processes(two_ranks):
    """Shuffle-BN across ranks sends images to other ranks' key encoders; unshuffled, every key must be back on
    the rank and in the row of its query (a wrong unshuffle still trains, silently, on mismatched pairs)."""
    reports_ = reports(two_ranks, "round_trip")
    for rank, report in enumerate(reports_):
        assert report["keys"].flatten().tolist() == [float(i + 8 * rank) for i in range(8)]
    shuffled = torch.cat([r["shuffled"] for r in reports_]).flatten()
    assert sorted(shuffled.tolist()) == [float(i) for i in range(16)]  # every image went somewhere, once
    assert not torch.equal(shuffled, torch.arange(16.0))  # and the batch really was redistributed
