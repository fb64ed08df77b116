"""The GPU session driver (benchmarks/gpu_session.py): deadlines, partial results, set-up without pip.

A lent GPU comes for minutes; these tests make sure the driver keeps to its budget and returns what ran,
and that every stage names benchmark cases that exist, before a GPU session depends on it."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"bench_{name}"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


gs = _load("gpu_session")

# writes a partial benchmark record, then works for a minute: the driver must stop it and keep the rows
SLOW = ("-c", "import json, sys, time\n"
              "json.dump({'benchmark': 'fake', 'rows': [{'ms': 1.0}], 'complete': False}, open(sys.argv[1], 'w'))\n"
              "print('measured one row', flush=True)\n"
              "time.sleep(60)\n", "{json}")


def test_stage_cut_at_its_cap_keeps_rows_and_later_stages_skip_when_out_of_budget(tmp_path):
    slow = gs.Stage("slow", "a stage that overruns", SLOW, SLOW, cap_s=3)
    later = gs.Stage("later", "no time left for this", SLOW, SLOW, cap_s=3)
    start = time.monotonic()
    budget = gs.RESERVE_S + 20 + 2  # room for the first stage only: 3 s later fewer than 20 s are left
    session = gs.run_session([slow, later], str(tmp_path), budget, smoke=True, env=dict(os.environ), facts={},
                             log=lambda s: None)
    assert time.monotonic() - start < 20
    first, second = session["stages"]
    assert first["cut"] is True and first["rc"] is None and 3 <= first["seconds"] < 15
    assert first["result"]["rows"] == [{"ms": 1.0}]
    assert second["skipped"] == "out of budget" and "rc" not in second
    on_disk = json.loads((tmp_path / "session.json").read_text())
    assert on_disk["stages"][0]["result"]["rows"] == [{"ms": 1.0}]
    log = (tmp_path / "session.log").read_text()
    assert "measured one row" in log and "cut at the time limit" in log
    assert sorted(os.listdir(tmp_path)) == ["session.json", "session.log"]  # the device returns <= 8 files


def test_pytest_summary_parsing():
    assert gs.pytest_summary("....\n83 passed, 2 skipped, 120 deselected in 61.20s\n") == \
        {"passed": 83, "skipped": 2, "deselected": 120}
    assert gs.pytest_summary("FAILED x\n1 failed, 3 passed, 1 error in 2.00s (0:00:02)") == \
        {"failed": 1, "passed": 3, "error": 1}
    assert gs.pytest_summary("collected nothing") == {}


def test_every_stage_names_cases_that_exist():
    gn = _load("bench_group_norm")
    at = _load("bench_attention")
    gn_names = {name for name, _, _ in gn.SHAPES}
    at_names = {s["case"] for s in at.shapes(False, 1)} | {s["case"] for s in at.shapes(True, 1)}
    for stage in gs.STAGES:
        for argv in (stage.gpu, stage.smoke):
            args = list(argv)
            if "--shapes" in args:
                wanted = args[args.index("--shapes") + 1].split(",")
                assert set(wanted) <= gn_names, (stage.name, wanted)
            if "--cases" in args:
                for case in args[args.index("--cases") + 1].split(","):
                    assert any(case in name for name in at_names), (stage.name, case)
            if "--dtypes" in args:
                assert set(args[args.index("--dtypes") + 1].split(",")) <= set(gn.DTYPES)
    assert len(set(gs.STAGE_NAMES)) == len(gs.STAGES)


def test_group_norm_bench_times_both_triton_paths_where_both_apply():
    gn = _load("bench_group_norm")
    shapes = {name: shape for name, shape, _ in gn.SHAPES}
    assert set(gn.path_variants(shapes["unet-L3"])) == {"triton-split"}  # 16K per group: default one-pass
    assert set(gn.path_variants(shapes["unet-L1"])) == {"triton-1pass"}  # 256K per group: default split
    assert gn.path_variants(shapes["vae-L0"]) == {}  # 4M per group: only the split passes make sense


def test_link_tree_imports_kernels_without_installing(tmp_path):
    folder = gs.link_tree(str(tmp_path))
    code = "import text2ct_engine.kernels.group_norm as g, text2ct_engine.ops; print(g.__file__)"
    env = dict(os.environ, PYTHONPATH=folder, TRITON_INTERPRET="1")
    # from the folder, as the stages then run: python -c / -m put the working folder first on sys.path
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=folder)
    assert out.returncode == 0, out.stderr[-500:]
    path = out.stdout.strip()
    assert path.startswith(folder)
    assert os.path.realpath(path) == os.path.join(ROOT, "kernels", "group_norm.py")
    for name in ("tests", "pytest.ini"):  # the tests stage runs pytest from the folder
        assert os.path.realpath(os.path.join(folder, name)) == os.path.join(ROOT, name)


def test_refuses_unknown_stage_and_cpu_without_smoke(capsys, tmp_path):
    assert gs.main(["--stages", "gn-goal,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert gs.main(["--stages", "gn-goal", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "no CUDA device" in err and len(err.splitlines()) == 1
        # the device call still returns why nothing ran
        assert "no CUDA device" in json.loads((tmp_path / "session.json").read_text())["error"]


def test_budget_counts_from_the_start_of_the_call(tmp_path):
    """Set-up time (pip, imports) is spent from the same budget: 30 s of it gone leaves 10 s, too few to start."""
    stage = gs.Stage("slow", "a stage that overruns", SLOW, SLOW, cap_s=3)
    session = gs.run_session([stage], str(tmp_path), gs.RESERVE_S + 40, smoke=True, env=dict(os.environ),
                             facts={}, log=lambda s: None, started=time.monotonic() - 30)
    assert session["stages"][0]["skipped"] == "out of budget"


def test_partial_save_while_a_stage_runs(tmp_path):
    """What session.json holds mid-stage: the rows so far and the log, marked running."""
    stage = gs.Stage("slow", "a stage that overruns", SLOW, SLOW, cap_s=4)
    snapshots = []
    real_atomic_write = gs._atomic_write

    def spy(path, text):
        real_atomic_write(path, text)
        if path.endswith("session.json"):
            snapshots.append(json.loads(text))
        else:
            snapshots.append(text)

    gs._atomic_write, real_save_every, gs.SAVE_EVERY_S = spy, gs.SAVE_EVERY_S, 1
    try:
        gs.run_session([stage], str(tmp_path), 100, smoke=True, env=dict(os.environ), facts={}, log=lambda s: None)
    finally:
        gs._atomic_write, gs.SAVE_EVERY_S = real_atomic_write, real_save_every
    running = [s for s in snapshots if isinstance(s, dict) and s["stages"] and "running_s" in s["stages"][0]]
    assert running and running[-1]["stages"][0]["result"]["rows"] == [{"ms": 1.0}]
    assert any(isinstance(s, str) and "slow (running)" in s and "measured one row" in s for s in snapshots)


@pytest.mark.skipif(os.environ.get("TEXT2CT_SLOW_TESTS") != "1", reason="~90 s: TEXT2CT_SLOW_TESTS=1")
def test_smoke_session_runs_every_stage(tmp_path):
    assert gs.main(["--smoke", "--out", str(tmp_path)]) == 0
    session = json.loads((tmp_path / "session.json").read_text())
    assert [s["name"] for s in session["stages"]] == list(gs.STAGE_NAMES)
    for s in session["stages"]:
        assert s["rc"] == 0, s
        assert s.get("pytest", {}).get("passed", 0) > 0 or s["result"]["complete"] and s["result"]["rows"]
