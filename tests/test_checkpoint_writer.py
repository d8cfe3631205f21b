"""Stage I's background checkpoint writer: the file it writes is the state at `submit`, whatever the training
does to its tensors afterwards; one write at a time; a failed write is raised in the training thread."""

import logging
import threading
import time

import pytest
import torch

from fit3d_hf.checkpoints import load_torch_checkpoint, save_torch_checkpoint
from fit3d_hf.lifting import checkpoint_writer
from fit3d_hf.lifting.checkpoint_writer import CheckpointWriter

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _state(device):
    generator = torch.Generator().manual_seed(0)
    return {
        "iteration": 1000,
        "gaussians": {"means": torch.randn(4000, 3, generator=generator).to(device)},
        "optimizer": {
            "state": {
                0: {
                    "step": torch.tensor(7.0),
                    "exp_avg": torch.randn(4000, 3, generator=generator).to(device),
                }
            },
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "view_stack": [3, 1, 2],
    }


def _assert_same(loaded, expected):
    assert loaded["iteration"] == expected["iteration"] and loaded["view_stack"] == expected["view_stack"]
    assert loaded["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    for got, want in (
        (loaded["gaussians"]["means"], expected["gaussians"]["means"]),
        (loaded["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"]),
        (loaded["optimizer"]["state"][0]["step"], expected["optimizer"]["state"][0]["step"]),
    ):
        assert got.device.type == "cpu" and torch.equal(got, want.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("background", [False, True])
def test_the_file_holds_the_state_at_submit(tmp_path, monkeypatch, device, background):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    state = _state(device)
    expected = {**state, "gaussians": {"means": state["gaussians"]["means"].clone()}}
    expected["optimizer"] = {
        **state["optimizer"],
        "state": {0: {k: v.clone() for k, v in state["optimizer"]["state"][0].items()}},
    }
    # hold the background write until the tensors were changed, as the next training steps would
    release = threading.Event()
    save = checkpoint_writer.save_torch_checkpoint

    def held_save(state, path):
        assert release.wait(30)
        return save(state, path)

    if background:
        monkeypatch.setattr(checkpoint_writer, "save_torch_checkpoint", held_save)
    else:
        release.set()
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter(background=background) as writer:
        writer.submit(state, path)
        assert path.exists() != background  # a background write is still in flight
        state["gaussians"]["means"].add_(1.0)  # the live tensors change in place
        state["optimizer"]["state"][0]["exp_avg"].mul_(0.0)
        release.set()
    _assert_same(load_torch_checkpoint(path), expected)
    # and it is the same file a synchronous save writes
    direct = save_torch_checkpoint(expected, tmp_path / "direct.pt")
    _assert_same(load_torch_checkpoint(direct), load_torch_checkpoint(path))


def test_one_write_at_a_time_and_the_last_one_wins(tmp_path, monkeypatch):
    running, most = [0], [0]
    lock = threading.Lock()
    save = checkpoint_writer.save_torch_checkpoint

    def counted_save(state, path):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return save(state, path)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(checkpoint_writer, "save_torch_checkpoint", counted_save)
    state = _state("cpu")
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter(background=True) as writer:
        for iteration in (1000, 2000, 3000):
            writer.submit({**state, "iteration": iteration}, path)
    assert most[0] == 1
    assert load_torch_checkpoint(path)["iteration"] == 3000
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_a_failed_write_is_raised_by_the_next_submit_or_wait(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the checkpoint's folder should be")
    writer = CheckpointWriter(background=True)
    writer.submit(_state("cpu"), blocker / "checkpoint.pt")
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once
    writer.submit(_state("cpu"), blocker / "checkpoint.pt")
    with pytest.raises(OSError):
        writer.submit(_state("cpu"), tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()  # the failed write stopped the next one


def test_leaving_with_an_error_logs_a_failed_write_instead_of_hiding_the_error(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with caplog.at_level(logging.ERROR, logger=checkpoint_writer.__name__):
        with pytest.raises(KeyboardInterrupt):
            with CheckpointWriter(background=True) as writer:
                writer.submit(_state("cpu"), blocker / "checkpoint.pt")
                raise KeyboardInterrupt
    assert any("checkpoint write failed" in record.getMessage() for record in caplog.records)


def test_without_room_for_the_snapshot_the_checkpoint_is_written_at_once(tmp_path, monkeypatch, caplog):
    def no_room(state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.48 GiB")

    monkeypatch.setattr(checkpoint_writer, "_snapshot", no_room)
    state = _state("cpu")
    path = tmp_path / "checkpoint.pt"
    with caplog.at_level(logging.WARNING, logger=checkpoint_writer.__name__):
        with CheckpointWriter(background=True) as writer:
            writer.submit(state, path)
            assert path.exists() and not writer.writing  # written before submit returned
    assert any("writing it in the training loop instead" in r.getMessage() for r in caplog.records)
    _assert_same(load_torch_checkpoint(path), state)


def _longest_round(x: torch.Tensor, running, end_round=lambda: None) -> float:
    """The longest round, in seconds, of 20 small ops on `x` (each round ended by `end_round`) while `running()`:
    a training loop's launches, to see whether another thread holds them up."""
    longest, last = 0.0, time.perf_counter()
    while running():
        for _ in range(20):
            x.add_(1)
        end_round()
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest


def test_a_write_in_the_background_leaves_the_training_thread_running(tmp_path):
    """The writer thread holds the GIL only briefly: a loop of small torch ops on this thread (as a training loop
    launching kernels) is never held up for long while a 400 MB checkpoint is written. torch.save given a path
    held the GIL while it finished the file, 0.25-0.35 s for 600 MB on a 2-core machine."""
    state = {
        "means": torch.randn(75_000_000),
        "moments": {"exp_avg": torch.randn(25_000_000)},
        "iteration": 7,
    }
    save_torch_checkpoint(state, tmp_path / "checkpoint.pt")  # the writes below replace an existing file
    x = torch.zeros(4)
    for _ in range(2):
        writer = threading.Thread(target=save_torch_checkpoint, args=(state, tmp_path / "checkpoint.pt"))
        writer.start()
        longest = _longest_round(x, writer.is_alive)
        writer.join()
        assert longest < 0.1, f"the loop waited {1000 * longest:.0f} ms for the writer thread"
    assert torch.equal(
        load_torch_checkpoint(tmp_path / "checkpoint.pt")["moments"]["exp_avg"], state["moments"]["exp_avg"]
    )


@pytest.mark.cuda
def test_the_host_copy_goes_through_the_staging_buffers_exactly(tmp_path, monkeypatch):
    """Tensors of every size relative to the staging buffers (empty, scalar, smaller, a multiple, with a
    remainder) and of several dtypes reach the file bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(checkpoint_writer, "_STAGING_BYTES", 4096)
    generator = torch.Generator().manual_seed(1)
    state = {
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "small": torch.randn(100, generator=generator),
        "multiple": torch.randn(4, 1024, generator=generator),  # 16 KiB: four whole chunks
        "remainder": torch.randn(3001, 7, generator=generator).to(torch.bfloat16),
        "codes": torch.randint(0, 1 << 40, (5000,), generator=generator),
        "mask": torch.rand(9999, generator=generator) > 0.5,
        "transposed": torch.randn(300, 200, generator=generator).t(),
    }
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter(background=True) as writer:
        writer.submit({name: tensor.cuda() for name, tensor in state.items()}, path)
    loaded = load_torch_checkpoint(path)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.cuda
def test_the_host_copy_does_not_hold_the_training_threads_launches(tmp_path):
    """While 1 GB is copied to the host, small kernels launched and finished on this thread keep their pace: copied
    straight into pageable memory, each launch waited for the transfer (a step took 113 ms instead of 8, H100)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    state = {"moments": torch.randn(256_000_000, device="cuda")}
    x = torch.zeros(4, device="cuda")
    for _ in range(20):
        x.add_(1)
    torch.cuda.synchronize()
    writer = CheckpointWriter(background=True)
    # the host copy alone: the file's hashing and writing are another matter (test above, on the CPU)
    saved = threading.Event()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_writer, "save_torch_checkpoint", lambda state, path: saved.set())
        writer.submit(state, tmp_path / "checkpoint.pt")
        # each round waits on its own stream's progress, as a training step does
        longest = _longest_round(x, lambda: not saved.is_set(), torch.cuda.current_stream().synchronize)
        writer.wait()
    assert longest < 0.05, f"the loop waited {1000 * longest:.0f} ms for the host copy"
