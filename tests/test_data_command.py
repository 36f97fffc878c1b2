"""`flowrl-jax data list | show | verify` on the packaged copy and on a tampered copy of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flowrl_jax.cli import main
from flowrl_jax.data.manifest import SUMS_FILE, read_sums, sha256_file
from flowrl_jax.data.registry import ENV_DATA_DIR, PACKAGED_DATA_DIR, REGISTRY


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)


def test_list_names_every_set_with_kind_rows_license_and_path(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split(maxsplit=4) for ln in out.splitlines()[1:] if ln.strip()
             and ln.split()[0] in REGISTRY}  # maxsplit: the path may hold spaces
    assert set(lines) == set(REGISTRY)
    assert lines["dapo_math_17k"][1:5] == [
        "train", "17917", "Apache-2.0",
        str(PACKAGED_DATA_DIR / "dapo_math_17k" / "dapo_math_17k.parquet")]
    assert lines["aime24"][1:4] == ["math_eval", "30", "MIT"]
    assert lines["humanevalplus_rllm"][1:4] == ["code_eval", "163", "Apache-2.0"]
    assert lines["code_train"][1:4] == ["train", "207", "MIT"]


def test_show_renders_the_prompt_template_and_the_gold(capsys):
    assert main(["data", "show", "aime24", "--index", "2"]) == 0
    out = capsys.readouterr().out
    assert "Solve the following math problem step by step." in out
    assert "regular octagon" in out
    assert out.split("--- gold ---\n")[1].split("\n")[0] == "371"
    assert main(["data", "show", "code_train"]) == 0
    out = capsys.readouterr().out
    assert "### Format: Read the inputs from stdin" in out and "test 0 (stdin):" in out
    assert main(["data", "show", "humanevalplus", "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "def has_close_elements" in out and "entry point: has_close_elements" in out


def test_show_rejects_a_bad_name_or_index(capsys):
    assert main(["data", "show", "aime24", "--index", "30"]) == 2
    assert "out of range: aime24 has 30 records" in capsys.readouterr().err
    assert main(["data", "show", "aime99"]) == 2
    assert "unknown data set 'aime99'" in capsys.readouterr().err


def test_shipped_checksums_cover_every_file():
    sums = read_sums(PACKAGED_DATA_DIR / SUMS_FILE)
    files = {p.relative_to(PACKAGED_DATA_DIR).as_posix() for p in PACKAGED_DATA_DIR.rglob("*")
             if p.is_file()}
    assert set(sums) == files - {SUMS_FILE, "README.md"}
    for info in REGISTRY.values():
        assert info.path in sums
        assert (PACKAGED_DATA_DIR / info.path).parent.joinpath("LICENSE").is_file()


def test_verify_passes_on_the_packaged_copy(capsys):
    assert main(["data", "verify"]) == 0
    out = capsys.readouterr().out
    assert f"{PACKAGED_DATA_DIR}: " in out and out.rstrip().endswith(": OK")


def test_verify_names_a_file_with_one_byte_changed_and_a_missing_file(tmp_path, capsys):
    copy = tmp_path / "data copy"
    shutil.copytree(PACKAGED_DATA_DIR, copy)
    assert main(["data", "verify", "--data-dir", str(copy)]) == 0
    capsys.readouterr()
    target = copy / "math500" / "test.jsonl"
    raw = bytearray(target.read_bytes())
    i = raw.index(b"integer")
    raw[i] = ord("J")  # same length, still valid JSON: only the checksum can tell
    target.write_bytes(bytes(raw))
    before = sha256_file(target)
    assert main(["data", "verify", "--data-dir", str(copy)]) == 1
    out = capsys.readouterr().out
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert fails == [f"FAIL {target}: sha256 differs from SHA256SUMS"]
    assert sha256_file(target) == before  # verify only reads
    (copy / "aime24" / "LICENSE").unlink()
    lines = (copy / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)
    (copy / "gsm8k" / "test.jsonl").write_text("".join(lines[:-1]))  # one row fewer
    assert main(["data", "verify", "--data-dir", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {copy / 'aime24' / 'LICENSE'}: missing" in out
    assert f"FAIL {copy / 'gsm8k' / 'test.jsonl'}: sha256 differs" in out
    assert f"FAIL gsm8k: {copy / 'gsm8k' / 'test.jsonl'} has 1318 rows, expected 1319" in out
    assert out.splitlines()[-1].endswith(": 4 problem(s)")  # math500 is still changed


def test_verify_names_a_missing_data_file(tmp_path, capsys):
    copy = tmp_path / "d"
    shutil.copytree(PACKAGED_DATA_DIR, copy)
    (copy / "amc23" / "test.jsonl").unlink()
    assert main(["data", "verify", "--data-dir", str(copy)]) == 1
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("FAIL")] == \
        [f"FAIL {copy / 'amc23' / 'test.jsonl'}: missing"]


def test_verify_rejects_a_data_dir_that_does_not_exist(tmp_path, capsys):
    assert main(["data", "verify", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "nope is not a directory" in capsys.readouterr().err


def test_a_built_wheel_carries_every_data_file(tmp_path):
    """`pip install .` (not only editable installs) gets the data: build a wheel from a copy of
    the source and look inside."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")  # the build backend, used without build isolation
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(repo / "configs", src / "configs", ignore=ignore)
    shutil.copytree(repo / "flowrl_jax", src / "flowrl_jax", symlinks=True, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("flowrl_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"flowrl_jax/assets/data/{p.relative_to(PACKAGED_DATA_DIR).as_posix()}"
               for p in PACKAGED_DATA_DIR.rglob("*") if p.is_file()}
    assert len(shipped) >= 70 and shipped <= names, sorted(shipped - names)[:5]
