"""benchmarks/device_all.sh runs on the GPU machine only; its `rastertrees` stage's shell runs here with a stand-in
Python and nvidia-smi, so that the device call does not find it broken."""

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


def test_rastertrees_runs_the_chosen_benchmark_in_each_tree(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "device_all.sh", tmp_path / "benchmarks")
    (tmp_path / "snap" / "old").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'Stand-in GPU'\n")
    # builds succeed; a benchmark prints a text line and a JSON line naming its arguments and folder
    _executable(
        bin_dir / "python",
        '#!/bin/bash\n[ "$1" = setup.py ] && exit 0\n'
        'echo "host time in $(basename "$PWD")"\necho "{\\"args\\": \\"$*\\"}"\n',
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "STAGES": "rastertrees",
        "RASTER_TREES": "snap/old",
        "TREES_BENCH": "benchmarks/profile_rasterizer.py --host",
        "LOGS": str(tmp_path / "logs"),
        "OUT": "",
    }
    result = subprocess.run(
        ["bash", "benchmarks/device_all.sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
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
