"""benchmarks/device_all.sh runs on the GPU machine only; its `rastertrees`, `liftnode` and `abba` stages' shell
runs here with a stand-in Python and nvidia-smi, so that the device call does not find it broken."""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _stand_in(tmp_path: Path, **variables: str) -> dict:
    """A copy of device_all.sh under tmp_path and the environment that runs it with the stand-ins: builds
    succeed; a benchmark prints a text line and a JSON line naming its arguments and folder."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "device_all.sh", tmp_path / "benchmarks")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'Stand-in GPU'\n")
    _executable(
        bin_dir / "python",
        '#!/bin/bash\n[ "$1" = setup.py ] && exit 0\n'
        'echo "host time in $(basename "$PWD")"\necho "{\\"args\\": \\"$*\\"}"\n',
    )
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "LOGS": str(tmp_path / "logs"),
        "OUT": "",
        **variables,
    }


def _run(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "benchmarks/device_all.sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_liftnode_passes_the_scene_count_and_the_carried_scene(tmp_path):
    env = _stand_in(tmp_path, STAGES="liftnode", LIFT_NODE_SCENES="16", LIFT_SCENE=".liftscene/bench00000")
    _run(tmp_path, env)
    (record,) = [
        json.loads(line) for line in (tmp_path / "logs" / "liftnode.jsonl").read_text().splitlines()[1:]
    ]
    assert record["args"].startswith("benchmarks/lift_node.py --views 300 --iterations 30000")
    assert "--points_per_sample 5 --work_dir /tmp/fit3d-liftbench" in record["args"]
    assert record["args"].endswith("--scenes 16 --base_scene .liftscene/bench00000")
    # without them: one scene per GPU, the scene generated there
    del env["LIFT_NODE_SCENES"], env["LIFT_SCENE"]
    _run(tmp_path, env)
    lines = (tmp_path / "logs" / "liftnode.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["args"].endswith("--work_dir /tmp/fit3d-liftbench")


def test_rastertrees_runs_the_chosen_benchmark_in_each_tree(tmp_path):
    env = _stand_in(
        tmp_path,
        STAGES="rastertrees",
        RASTER_TREES="snap/old",
        TREES_BENCH="benchmarks/profile_rasterizer.py --host",
    )
    (tmp_path / "snap" / "old").mkdir(parents=True)
    _run(tmp_path, env)
    text = (tmp_path / "logs" / "rastertrees.txt").read_text().splitlines()
    assert text[0] == "== tree snap/old: benchmarks/profile_rasterizer.py --host"
    assert text[1] == "host time in old"
    assert text[3] == "== tree .: benchmarks/profile_rasterizer.py --host"
    assert text[4] == f"host time in {tmp_path.name}"
    records = [
        json.loads(line) for line in (tmp_path / "logs" / "rastertrees.jsonl").read_text().splitlines()
    ]
    assert records == [
        {"tree": "snap/old", "args": "benchmarks/profile_rasterizer.py --host"},
        {"tree": ".", "args": "benchmarks/profile_rasterizer.py --host"},
    ]


def test_abba_builds_the_patched_copies_beside_this_tree_and_alternates_the_sides(tmp_path):
    """The copies' builds overlap this tree's (each stand-in build logs its start, waits, logs its end); each
    patch's stages then alternate between this tree (A) and its copy (B); a patch that does not apply is reported
    and the next one still runs."""
    env = _stand_in(
        tmp_path,
        STAGES="abba",
        ABBA_PATCH="good.patch bad.patch",
        ABBA_STAGES="profile",
        ABBA_ROUNDS="2",
    )
    builds = tmp_path / "builds.txt"
    _executable(
        tmp_path / "bin" / "python",
        '#!/bin/bash\nif [ "$1" = setup.py ]; then\n'
        f'  echo "start $(basename "$PWD")" >>{builds}; sleep 1; echo "end $(basename "$PWD")" >>{builds}; exit 0\nfi\n'
        '[ -e patched.txt ] && echo "patched tree $(basename "$PWD")" || echo "plain tree $(basename "$PWD")"\n',
    )
    (tmp_path / "good.patch").write_text("--- /dev/null\n+++ b/patched.txt\n@@ -0,0 +1 @@\n+patched\n")
    (tmp_path / "bad.patch").write_text("--- a/missing.txt\n+++ b/missing.txt\n@@ -1 +1 @@\n-old\n+new\n")
    assert "ABBA BUILD FAILED: bad.patch" in _run(tmp_path, env).stdout
    events = builds.read_text().split("\n")
    # this tree and the good copy built at once (the bad copy stops at its patch, before building)
    assert sorted(events[:2]) == sorted([f"start {tmp_path.name}", "start good"])
    assert sorted(events[2:4]) == sorted([f"end {tmp_path.name}", "end good"])
    abba = tmp_path / "logs" / "abba" / "good"
    for round_ in "12":
        assert (abba / f"{round_}A" / "profile.txt").read_text() == f"plain tree {tmp_path.name}\n"
        assert (abba / f"{round_}B" / "profile.txt").read_text() == "patched tree good\n"
    assert not (tmp_path / "logs" / "abba" / "bad").exists()
