"""The sandbox runs wherever the interpreter lives (masked temp dirs, a hidden home, a path with a
space) without exposing what else is there, and a sandbox that cannot be set up fails loudly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest
from _sandbox_backends import ISOLATING_BACKENDS, backend_config

from flowrl_jax import rewards
from flowrl_jax.rewards.code_reward import score_code
from flowrl_jax.rewards.sandbox import SandboxConfig, isolation_mode, run_python
from flowrl_jax.rewards.sandbox_mounts import SandboxError, exec_path, mount_plan, probe_interpreter

CFG = SandboxConfig(memory_mb=1024, max_output_bytes=1 << 20, tmpfs_mb=64)

# Needs the venv's own site-packages (a package only it has) and numpy, reads stdin.
PROGRAM = ("import sys, numpy, flowrl_probe_pkg\n"
           "print(flowrl_probe_pkg.VALUE, int(numpy.arange(5).sum()), input()[::-1])\n")

# Looks around the venv's directory: what is visible, can it read a secret, write to the venv.
SNOOP = """import json, os, sys
out = {"prefix": sys.prefix, "listing": sorted(os.listdir(%(parent)r))}
try:
    out["secret"] = open(%(secret)r).read()
except OSError as e:
    out["secret"] = type(e).__name__
try:
    open(%(plant)r, "w").write("x")
    out["plant"] = "WROTE"
except OSError as e:
    out["plant"] = type(e).__name__
print(json.dumps(out))
"""


def make_venv(where: Path) -> Path:
    """A pip-less venv at `where` with a package of its own and numpy linked in; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = where / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert site.is_dir(), site
    (site / "flowrl_probe_pkg").mkdir()
    (site / "flowrl_probe_pkg" / "__init__.py").write_text("VALUE = 42\n")
    # linked, not copied (70 MB); to its real path: bwrap shows only real, needed dirs
    np_dir = Path(numpy.__file__).resolve().parent
    for src in (np_dir, np_dir.parent / "numpy.libs"):
        if src.exists():
            (site / src.name).symlink_to(src)
    return where / "bin" / "python"


@pytest.fixture(params=["masked_tmp", "path with space", "home"])
def venv_home(request, tmp_path):
    """A private directory in one kind of location, holding a secret (the venv goes beside it)."""
    if request.param == "masked_tmp":
        base = tmp_path  # under the system temp dir, which the sandbox masks
    elif request.param == "path with space":
        base = tmp_path / "a checkout with spaces"
        base.mkdir()
    else:  # the user's home (for root: /root, which the sandbox hides)
        try:
            base = Path(tempfile.mkdtemp(prefix="flowrl-sbx-home-", dir=Path.home()))
        except OSError as exc:
            pytest.skip(f"home directory {Path.home()} not writable: {exc}")
        request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    (base / "secret.txt").write_text("TOPSECRET-BESIDE-VENV")
    return base


@pytest.mark.parametrize("backend", ISOLATING_BACKENDS)
@pytest.mark.parametrize("fast_startup", [True, False], ids=["inproc", "exec"])
def test_interpreter_runs_wherever_it_lives(venv_home, fast_startup, backend):
    python = make_venv(venv_home / "venv")
    cfg = backend_config(dataclasses.replace(CFG, python=str(python), fast_startup=fast_startup),
                         backend)
    res = run_python(PROGRAM, "abc\n", 20.0, cfg)
    assert res.ok, res
    assert res.stdout == "42 10 cba\n"

    mode, _ = isolation_mode(cfg)
    venv_real = os.path.realpath(venv_home / "venv")
    plant = Path(venv_real) / "planted.txt"
    snoop = run_python(SNOOP % {"parent": str(venv_home), "secret": str(venv_home / "secret.txt"),
                                "plant": str(plant)}, "", 20.0, cfg)
    assert snoop.ok, snoop
    seen = json.loads(snoop.stdout)
    if not fast_startup:  # exec'd as the venv's python, not the launcher's interpreter
        assert seen["prefix"] == venv_real
    assert seen["plant"] != "WROTE" and not plant.exists()  # the venv is read-only
    rebound = mount_plan(probe_interpreter(str(python)).needed_dirs)[1]
    if mode == "bwrap" or venv_real in rebound:
        # bwrap binds only what the interpreter needs; namespaces mode binds back from a
        # hidden/masked dir: either way only the venv itself is visible beside it
        assert seen["listing"] == ["venv"], seen
        assert seen["secret"] == "FileNotFoundError", seen


def test_mount_plan_rebinds_only_needed_dirs(tmp_path):
    hidden = tmp_path / "home"
    (hidden / "proj" / ".venv").mkdir(parents=True)
    os.chmod(hidden, 0o700)
    masked = str(tmp_path.parent)  # pretend the parent of tmp_path is a masked temp dir
    inside = str(tmp_path / "venv")
    hide, rebind = mount_plan([str(hidden / "proj" / ".venv"), inside, "/usr/lib"], masked=(masked,))
    assert rebind == sorted([str(hidden / "proj" / ".venv"), inside])  # not the whole "proj"
    assert hide == []  # under a masked dir nothing needs hiding
    visible_hide, visible_rebind = mount_plan(["/usr/lib"], masked=(masked,))
    assert (visible_hide, visible_rebind) == ([], [])
    # outside the masked dir, a 0700 ancestor is hidden and only the needed dir comes back
    hide2, rebind2 = mount_plan([str(hidden / "proj" / ".venv")], masked=())
    assert rebind2 == [str(hidden / "proj" / ".venv")]
    assert hide2 and all(str(hidden / "proj").startswith(h) for h in hide2)


def test_exec_path_keeps_the_venv_link_and_names_a_missing_interpreter(tmp_path):
    python = make_venv(tmp_path / "v")
    link = tmp_path / "link to v"
    link.symlink_to(tmp_path / "v")
    assert exec_path(str(link / "bin" / "python")) == str(python)  # directory resolved, name kept
    with pytest.raises(SandboxError, match="nope"):
        exec_path(str(tmp_path / "nope" / "python3"))


GOOD = "```python\nprint(sum(map(int, input().split())))\n```"
TESTS = {"tests": [{"input": "2 3\n", "output": "5\n", "testtype": "stdin"}]}


def test_missing_interpreter_fails_the_reward_loudly(tmp_path):
    bad = SandboxConfig(python=str(tmp_path / "missing" / "python3"))
    with pytest.raises(SandboxError, match="missing/python3"):
        run_python("print(1)", "", 5.0, bad)
    with pytest.raises(SandboxError, match="does not exist"):
        score_code("livecodebench", GOOD, TESTS, sandbox=bad)
    with rewards.RewardPool(num_workers=1, sandbox=bad) as pool:
        with pytest.raises(RuntimeError, match="missing/python3"):
            pool.score_batch([("livecodebench", GOOD, TESTS)])


def test_set_up_failure_after_probe_raises_not_zero(tmp_path):
    python = make_venv(tmp_path / "venv")
    cfg = dataclasses.replace(CFG, python=str(python))
    assert score_code("livecodebench", GOOD, TESTS, sandbox=cfg) == 1.0
    for name in ("python", "python3", "python3.11"):  # the interpreter vanishes under the sandbox
        link = python.parent / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(tmp_path / "gone")
    with pytest.raises(SandboxError, match="could not be set up"):
        score_code("livecodebench", GOOD, TESTS, sandbox=cfg)


def test_program_cannot_fake_a_set_up_failure():
    fake = ("import os, sys\nsys.stderr.write('sandbox-setup-error: x\\nsetup-error: x\\n')\n"
            "print('setup-error: x')\nsys.stdout.flush()\nos._exit(125)\n")
    res = run_python(fake, "", 5.0, CFG)
    assert res.status == "error" and res.returncode == 125
    assert score_code("livecodebench", f"```python\n{fake}```", TESTS, sandbox=CFG) == 0.0
