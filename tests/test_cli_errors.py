"""cli.run_guarded: bad input, failed allocations and OS errors are one ``error:`` line and exit 2."""
import pytest
import torch

from text2ct_engine.cli import run_guarded


def _raise(err):
    def job():
        raise err
    return job


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8796093022208 bytes"),
    MemoryError(),
])
def test_failed_allocation_is_one_line(err, capsys):
    assert run_guarded(_raise(err), oom_hint="try a smaller --size") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory: "), lines
    assert lines[0].endswith("; try a smaller --size")


def test_os_error_names_the_path(capsys):
    assert run_guarded(_raise(PermissionError(13, "Permission denied", "/sys/m"))) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: /sys/m: Permission denied"]
    assert run_guarded(_raise(FileExistsError(17, "File exists", "afile"))) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: afile: File exists"]


def test_value_error_and_success_unchanged_other_bugs_still_raise(capsys):
    assert run_guarded(_raise(ValueError("bad --size"))) == 2
    assert capsys.readouterr().err == "error: bad --size\n"
    assert run_guarded(lambda: None) == 0
    with pytest.raises(RuntimeError, match="a bug"):
        run_guarded(_raise(RuntimeError("a bug")))


@pytest.mark.parametrize("argv", [
    ["text2ct_engine.sample", "--prompt", "x", "--out", ""],
    ["text2ct_engine.data.phantom", "--n", "1", "--out", ""],
    ["text2ct_engine.train", "vae", "--data", "d", "--out", ""],
    ["text2ct_engine.memory", "--json", ""],
    ["text2ct_engine.evaluate", "--generated", "g", "--real", ""],
])
def test_an_empty_path_is_refused_before_any_work(argv, tmp_path):
    """``--out "$OUT"`` with OUT unset must not write into the current folder."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "empty path" in lines[0], done.stderr[-500:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert run_guarded(_raise(KeyboardInterrupt()), interrupted="resume with --resume") == 130
    assert capsys.readouterr().err == "interrupted: resume with --resume\n"
