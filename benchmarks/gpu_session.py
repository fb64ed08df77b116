"""Everything a lent GPU should measure, in one call that fits the lease: stages by priority, under a deadline.

    python benchmarks/gpu_session.py [--budget 540] [--out DIR] [--stages gn-goal,attn-goal,...]
    python benchmarks/gpu_session.py --smoke      # on a CPU: every stage on tiny inputs (the plumbing only)
    python benchmarks/gpu_session.py --list

A lent GPU comes for minutes (DESIGN, .library/device): one call of at most ten minutes, and at most eight
files back. So the stages run in the order of what the open issues need, each in its own process group
under a time cap and the session's remaining budget; a stage that runs out of time is stopped, and the rows
it measured so far are kept (every benchmark rewrites its JSON after each row). Everything comes back in
two files under ``--out`` (default ``$OUT``, else benchmarks/out/gpu):

* ``session.json``: device, versions, commit, and per stage: command, exit code, seconds, whether it was
  cut, the pytest summary or the benchmark's JSON record (rows, copy bandwidth, summary);
* ``session.log``: every stage's output, one after another.

Both are rewritten after every stage, so even a session cut short by the device tool returns what ran.
Nothing is downloaded: the project is made importable in place (``pip install --no-deps -e .``, or, where
pip cannot build, a folder of links that maps ``kernels/`` to ``text2ct_engine.kernels``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
VAE_SHAPES = "vae-L2,vae-L2in,vae-L1,vae-L0"
UNET_SHAPES = "unet-L0,unet-L1,unet-L2,unet-L3"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One measurement: ``gpu``/``smoke`` are argv lists after the interpreter; ``{json}`` is replaced by
    the stage's JSON path. ``cap_s`` bounds the stage even when the budget would allow more."""
    name: str
    why: str
    gpu: tuple[str, ...]
    smoke: tuple[str, ...]
    cap_s: int
    env: tuple[tuple[str, str], ...] = ()
    pytest: bool = False


def _bench(script: str, *args: str) -> tuple[str, ...]:
    return (os.path.join(BENCH, script), *args)


# attention first: its compiled tests are the ones no other stage covers, and a cut stage loses the last file
_TESTS = ("-m", "pytest", "tests/test_attention.py", "tests/test_group_norm.py", "-p", "no:cacheprovider", "-v",
          "--durations=10")

STAGES = (
    Stage("gn-goal", "issue 3 goals: VAE shapes, bf16, forward and forward+backward vs torch eager",
          _bench("bench_group_norm.py", "--shapes", VAE_SHAPES, "--dtypes", "bf16", "--no-compile",
                 "--out", "{json}"),
          _bench("bench_group_norm.py", "--shapes", "unet-L3", "--dtypes", "fp32", "--no-compile", "--reps", "2",
                 "--out", "{json}"),
          cap_s=150),
    Stage("attn-goal", "issue 4 goal: head 32 self-attention at 8k-32k tokens, bf16, vs every SDPA backend",
          _bench("bench_attention.py", "--cases", "128x128x32 L3 self,128x128x128 L3 self,128x128x128 L4 self",
                 "--json", "{json}"),
          _bench("bench_attention.py", "--cpu", "--cases", "128x128x32 L4 cross1", "--warmup", "0", "--reps", "1",
                 "--json", "{json}"),
          cap_s=150),
    Stage("tests", "the kernel tests on compiled kernels (interpreter off), GPU-sized cases included",
          (*_TESTS, "-m", "kernel"), (*_TESTS, "-k", "invalid or bad"), cap_s=180,
          env=(("TEXT2CT_TEST_DEVICE", "cuda"),), pytest=True),
    Stage("memory", "measured peak memory of sampling, decoding and training next to the plan",
          _bench("bench_memory.py", "--only", "sample,decode_tiled,decode_tiled_fast,decode_tiled_device,"
                 "decode_untiled,train,train_ckpt,train_vae_ckpt,train_clip_ckpt", "--json", "{json}"),
          _bench("bench_memory.py", "--volume", "32", "32", "32", "--only", "sample", "--json", "{json}"),
          cap_s=180),
    Stage("unet-step", "the Text2CT UNet's sampling and training step: engine ops vs torch ops, NCDHW vs NDHWC",
          _bench("bench_unet_step.py", "--json", "{json}"),
          _bench("bench_unet_step.py", "--latent", "4", "16", "16", "8", "--modes", "sample", "--reps", "1",
                 "--json", "{json}"),
          cap_s=180),
    Stage("decode", "the exact tiled decode at 512x512x128, bf16: activations on the host vs on the GPU vs auto",
          _bench("bench_tiled_decode.py", "--latent", "128", "128", "32", "--dtype", "bf16", "--variants",
                 "untiled,low,fast", "--storage", "host,device,auto", "--out", "{json}"),
          _bench("bench_tiled_decode.py", "--latent", "8", "8", "4", "--variants", "untiled,low",
                 "--storage", "host,auto", "--out", "{json}"),
          cap_s=180),
    Stage("gn-compile", "the same VAE shapes against torch.compile of silu(group_norm(x)) (compiles first)",
          _bench("bench_group_norm.py", "--shapes", VAE_SHAPES, "--dtypes", "bf16", "--out", "{json}"),
          _bench("bench_group_norm.py", "--shapes", "unet-L3", "--dtypes", "fp32", "--no-backward", "--reps", "2",
                 "--out", "{json}"),
          cap_s=180),
    Stage("gn-unet", "GroupNorm at the UNet's shapes (time-embedding add fused), bf16, both Triton paths",
          _bench("bench_group_norm.py", "--shapes", UNET_SHAPES, "--dtypes", "bf16", "--no-compile",
                 "--out", "{json}"),
          _bench("bench_group_norm.py", "--shapes", "unet-L2", "--dtypes", "bf16", "--no-compile", "--no-backward",
                 "--reps", "2", "--out", "{json}"),
          cap_s=120),
    Stage("attn-cross", "cross-attention to 1 and 512 text tokens, and the level-4 self-attention",
          _bench("bench_attention.py", "--cases", "cross,128x128x32 L4 self", "--json", "{json}"),
          _bench("bench_attention.py", "--cpu", "--cases", "128x128x128 L4 cross1", "--backends", "sdpa-math,naive",
                 "--warmup", "0", "--reps", "1", "--json", "{json}"),
          cap_s=120),
    Stage("gn-layouts", "GroupNorm channels_last_3d and fp16 at the VAE shapes (no torch.compile)",
          _bench("bench_group_norm.py", "--shapes", VAE_SHAPES, "--dtypes", "bf16,fp16", "--channels-last",
                 "--no-compile", "--out", "{json}"),
          _bench("bench_group_norm.py", "--shapes", "unet-L3", "--dtypes", "bf16", "--channels-last", "--no-compile",
                 "--no-backward", "--reps", "2", "--out", "{json}"),
          cap_s=120),
    Stage("encode", "the latent cache's exact tiled encode at 512x512x128, bf16: host vs GPU storage vs untiled",
          _bench("bench_tiled_decode.py", "--encode", "--latent", "128", "128", "32", "--dtype", "bf16",
                 "--variants", "untiled,low", "--storage", "host,device", "--out", "{json}"),
          _bench("bench_tiled_decode.py", "--encode", "--latent", "8", "8", "4", "--variants", "untiled,low",
                 "--storage", "host,auto", "--out", "{json}"),
          cap_s=120),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
RESERVE_S = 25  # kept back for stopping a stage (SIGINT, 10 s, SIGKILL, 10 s) and writing the files
SAVE_EVERY_S = 15  # while a stage runs, its log and rows so far are saved this often (the call may be cut)


# ------------------------------------------------------------------------------------------ set-up
def link_tree(folder: str) -> str:
    """A folder whose ``text2ct_engine`` package is the checkout's, with ``kernels/`` and ``csrc/`` linked in
    as ``text2ct_engine.kernels`` / ``.csrc`` (what setup.py's package_dir does), and the checkout's tests/
    and pytest.ini beside it; returns it, to be PYTHONPATH and the stages' working folder (from the
    checkout's root, ``python -m`` would find its kernels-less text2ct_engine/ first)."""
    pkg = os.path.join(folder, "text2ct_engine")
    os.makedirs(pkg, exist_ok=True)
    src = os.path.join(ROOT, "text2ct_engine")
    links = {os.path.join(pkg, name): os.path.join(src, name) for name in os.listdir(src) if name != "__pycache__"}
    links.update({os.path.join(pkg, "kernels"): os.path.join(ROOT, "kernels"),
                  os.path.join(pkg, "csrc"): os.path.join(ROOT, "csrc"),
                  os.path.join(folder, "tests"): os.path.join(ROOT, "tests"),
                  os.path.join(folder, "pytest.ini"): os.path.join(ROOT, "pytest.ini")})
    for link, target in links.items():
        if not os.path.lexists(link):
            os.symlink(target, link)
    return folder


def _importable(env: dict, cwd: str) -> bool:
    probe = [sys.executable, "-c", "import text2ct_engine.kernels.group_norm, text2ct_engine.ops"]
    return subprocess.run(probe, env=env, cwd=cwd, capture_output=True).returncode == 0


def make_importable(env: dict, log) -> tuple[dict, str]:
    """(environment, working folder) in which the stages import the checkout's text2ct_engine, kernels
    included: as installed, after ``pip install -e`` without dependencies, or through a folder of links."""
    if _importable(env, ROOT):
        return env, ROOT
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-e", ROOT]  # offline: nothing to fetch, no index to wait for
    try:
        done = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess(pip, 1, "", "pip ran over 120 s")
    if done.returncode == 0 and _importable(env, ROOT):
        log("set-up: installed the checkout in place (pip -e, no dependencies)")
        return env, ROOT
    folder = link_tree(tempfile.mkdtemp(prefix="text2ct-links-"))
    env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (folder, env.get("PYTHONPATH", "")) if p))
    log(f"set-up: pip could not install in place ({(done.stderr or '').strip()[-200:]!r}); using links in {folder}")
    if not _importable(env, folder):
        raise RuntimeError("text2ct_engine cannot be imported here: is torch (and triton) installed?")
    return env, folder


def device_facts(env: dict) -> dict:
    """GPU, driver, versions and commit, as far as this machine tells."""
    facts: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        facts["nvidia_smi"] = f"unavailable: {err}"
    code = ("import json, torch\ntry:\n import triton; tv = triton.__version__\nexcept ImportError:\n tv = None\n"
            "print(json.dumps({'torch': torch.__version__, 'triton': tv, 'cuda': torch.version.cuda,"
            " 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    try:  # the last line: whatever an import prints before it is not ours
        facts.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        facts["versions"] = (out.stderr or out.stdout).strip()[-300:]
    try:
        git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        facts["commit"] = git.stdout.strip() if git.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):  # no git on the machine: the commit is not known there
        facts["commit"] = None
    return facts


# ------------------------------------------------------------------------------------------ running
def run_stage(argv: list[str], env: dict, timeout_s: float, log_path: str, cwd: str = ROOT,
              while_running: Callable[[], None] | None = None) -> tuple[int | None, float, bool]:
    """Run ``argv`` in ``cwd`` in its own process group with output to ``log_path``; stop the whole group
    (SIGINT, then SIGKILL) at ``timeout_s``; call ``while_running`` every SAVE_EVERY_S seconds meanwhile.
    Returns (exit code or None when stopped, seconds, cut)."""
    start = time.monotonic()
    end = start + max(timeout_s, 1)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=max(min(SAVE_EVERY_S, end - time.monotonic()), 0.01))
                    return rc, time.monotonic() - start, False
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= end:
                        raise
                    if while_running is not None:
                        while_running()
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None, time.monotonic() - start, True


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_summary(text: str) -> dict:
    """Counts from pytest's closing line ('3 passed, 1 failed in 2.0s'), {} if there is none."""
    for line in reversed(text.splitlines()):
        if re.search(r"\b(passed|failed|error|no tests ran)\b", line) and " in " in line:
            return {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                    for n, kind in _PYTEST_COUNT.findall(line)}
    return {}


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_session(stages: list[Stage], out: str, budget_s: float, smoke: bool, env: dict,
                log=print, facts: dict | None = None, cwd: str = ROOT, started: float | None = None) -> dict:
    """Run ``stages`` in order within ``budget_s`` seconds from ``started`` (a ``time.monotonic()``; default
    now), in ``cwd``; returns (and keeps writing) the session record. ``facts`` replaces the device facts
    (tests)."""
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-session-")
    deadline = (time.monotonic() if started is None else started) + budget_s
    session = {"smoke": smoke, "budget_s": budget_s, "device": device_facts(env) if facts is None else facts,
               "stages": []}
    logs: list[str] = []

    def save() -> None:
        _atomic_write(os.path.join(out, "session.json"), json.dumps(session, indent=1) + "\n")
        _atomic_write(os.path.join(out, "session.log"), "".join(logs))

    save()
    for stage in stages:
        left = deadline - time.monotonic() - RESERVE_S
        record: dict = {"name": stage.name, "why": stage.why}
        session["stages"].append(record)
        if left < 20:
            record["skipped"] = "out of budget"
            log(f"== {stage.name}: skipped, {max(left, 0):.0f} s left")
            continue
        json_path = os.path.join(work, f"{stage.name}.json")
        argv = [sys.executable, *(a.replace("{json}", json_path) for a in (stage.smoke if smoke else stage.gpu))]
        stage_env = dict(env, PYTHONUNBUFFERED="1", **({} if smoke else dict(stage.env, TRITON_INTERPRET="0")))
        timeout = min(stage.cap_s, left)
        record["command"] = " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv[1:])
        log(f"== {stage.name} (up to {timeout:.0f} s): {stage.why}")
        log_path = os.path.join(work, f"{stage.name}.log")

        def collect(final: bool) -> str:
            """The stage's log so far into ``record`` (pytest counts or benchmark rows)."""
            with open(log_path, errors="replace") as f:
                text = f.read()
            if stage.pytest:
                record["pytest"] = pytest_summary(text)
            elif os.path.isfile(json_path):
                try:
                    with open(json_path) as f:
                        record["result"] = json.load(f)
                except ValueError:  # caught mid-rewrite (benchmarks write atomically; be safe anyway)
                    pass
            if not final:
                record["running_s"] = round(time.monotonic() - began, 1)
            return text

        def save_partial() -> None:  # a call cut by the device tool still returns the stage so far
            text = collect(final=False)
            logs.append(f"==== {stage.name} (running): {record['command']}\n{text}\n")
            save()
            logs.pop()

        began = time.monotonic()
        rc, seconds, cut = run_stage(argv, stage_env, timeout, log_path, cwd, save_partial)
        text = collect(final=True)
        record.pop("running_s", None)
        logs.append(f"==== {stage.name}: {record['command']}\n{text}\n==== {stage.name}: exit {rc}, "
                    f"{seconds:.0f} s{', cut at the time limit' if cut else ''}\n\n")
        record.update(rc=rc, seconds=round(seconds, 1), cut=cut)
        log(f"   exit {rc}, {seconds:.0f} s{' (cut)' if cut else ''}")
        save()
    save()
    return session


def refuse(out: str, why: str) -> int:
    """One error line, and the same in ``out/session.json`` where that can be written: a device call that
    could not start its stages still says why."""
    print(f"error: {why}", file=sys.stderr)
    try:
        os.makedirs(out, exist_ok=True)
        _atomic_write(os.path.join(out, "session.json"), json.dumps({"error": why, "stages": []}, indent=1) + "\n")
    except OSError:
        pass
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages together (default 540)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(BENCH, "out", "gpu"))
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma list, in the order to run them")
    p.add_argument("--smoke", action="store_true", help="tiny CPU versions of every stage (checks the plumbing)")
    p.add_argument("--list", action="store_true", help="print the stages and exit")
    started = time.monotonic()  # the budget counts from here: set-up (pip, imports) is part of the call
    args = p.parse_args(argv)
    if args.list:
        for s in STAGES:
            print(f"{s.name:11s} cap {s.cap_s:3d} s  {s.why}")
        return 0
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        print(f"error: unknown stage(s) {unknown}: choose from {', '.join(STAGE_NAMES)}", file=sys.stderr)
        return 2
    try:
        env, cwd = make_importable(dict(os.environ), print)
    except RuntimeError as err:
        return refuse(args.out, str(err))
    if not args.smoke:
        check = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() "
                                "else 1)"], env=env)
        if check.returncode != 0:
            return refuse(args.out, "no CUDA device here: run with --smoke to check the stages on a CPU")
    session = run_session([s for n in names for s in STAGES if s.name == n], args.out, args.budget,
                          args.smoke, env, cwd=cwd, started=started)
    failed = [s["name"] for s in session["stages"] if s.get("rc") not in (0,) or s.get("skipped")]
    print(f"wrote {os.path.join(args.out, 'session.json')} and session.log; "
          + (f"incomplete: {', '.join(failed)}" if failed else "every stage finished"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
