"""The compute benchmarks run end to end (``--quick``): a benchmark that crashes on a result
shape it did not expect (e.g. an exact path that now carries a bound) is caught here, not at the
next full run. Speed is not checked: the quick runs only exercise every code path of the table,
the notes and the plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("attention.py", ["attention.md"]),
        ("tensor_attention.py", ["tensor_attention.md"]),
        ("lora_gradient.py", ["lora_gradient.md"]),
    ],
)
def test_quick_benchmark_runs(script: str, outputs: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in outputs:
        text = (tmp_path / name).read_text()
        assert "|---" in text, text[:2000]  # a markdown table was written
