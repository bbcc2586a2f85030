"""A real wheel (not only the editable install) carries the three packages and their data files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("torouter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("torouter/__init__.py", "torouter/routers/mlp.py", "torouter/prepare/prompts/demo.jsonl",
                   "torouter/demo_experts.yaml", "langchain_torouter/chat_models.py", "llamaindex_torouter/base.py",
                   "torouter/prepare/_sandbox_child.py"):
        assert needed in names, needed
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # Import from the installed wheel only: drop the checkout (and the editable install's paths).
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', %r, %r)]; sys.path.insert(0, %r); "
            "import torouter, langchain_torouter, llamaindex_torouter; from torouter.prepare import demo_prompts; "
            "from torouter.prepare.scorers import run_code_tests; "
            "assert run_code_tests('def f():\\n    return 1', 'assert f() == 1').passed; "
            "print(torouter.__file__, len(demo_prompts()))") % (str(ROOT), str(ROOT / "shared"), str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    path, count = out.stdout.split()
    assert path.startswith(str(target)) and int(count) == 64
