"""Every write failure is safe (issue #27): an output that cannot be written (a file in the
way, no permission, a read-only file system, a full disk) is one ``error: cannot write PATH:
<reason>`` line and exit 2 in every command, with no traceback, and a failed write leaves no
temporary behind and keeps the previous good file (``checkpoints/last.ckpt`` included).

A full disk and a read-only file system are real: small tmpfs mounts in a private mount
namespace (``unshare -m``; ``--map-root-user`` when not root), where the CLI runs in one
subprocess (:func:`_namespace_driver`) that reports back as JSON. Where the namespace or the
mount is not permitted those tests are skipped, saying why."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from densessl.cli import main
from densessl.errors import OutputError
from densessl.io import atomic_write, save_torch, write_text
from tests.reliability.helpers import ROOT, SAME_IMAGE, TINY, sets

RUN = TINY + ["train.num_workers=0"]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
READ_ONLY = os.strerror(errno.EROFS)  # "Read-only file system"


def _one_error(err: str) -> str:
    """The one ``error:`` line of ``err``; no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.tmp")) if folder.exists() else []


def _encoder(folder: Path) -> Path:
    """An encoder.pt as pretraining writes it (a torchvision ResNet-18 without fc)."""
    from densessl.models import ResNetBackbone

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    write_text(folder / "encoder.json", json.dumps({"backbone": "resnet18", "in_channels": 3}))
    return save_torch(folder / "encoder.pt", ResNetBackbone("resnet18").state_dict())


def _sweep_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_text(folder / "sweep.yaml", json.dumps(
        {"name": "w", "base": SAME_IMAGE, "set": {"model.split_bn_groups": 2},
         "grid": {"seed": [0]}, "report": {"x": None, "over": ["seed"]}}))


# --- a file in the way, atomic writes: in this process ---------------------------------------

def test_export_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    weights = _encoder(tmp_path / "run")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "x.pt", blocker / "sub" / "x.pt"):
        code = main(["export", str(weights), "--to", "torchvision", "--out", str(out)])
        err = _one_error(capsys.readouterr().err)
        assert code == 2
        assert err == f"error: cannot write {out}: Not a directory ({blocker} is a file)", err
    assert blocker.read_text() == "not a folder"


def test_other_outputs_under_a_regular_file_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    sweep = _sweep_file(tmp_path)
    for argv, named in [
        (["sweep", str(sweep), "--out", str(blocker / "sweep")], blocker / "sweep"),
        (["inspect-pairs", SAME_IMAGE, "--cells", "-n", "1", "--json", str(blocker / "c.json"),
          *sets(RUN)], blocker / "c.json"),
    ]:
        code = main(argv)
        err = _one_error(capsys.readouterr().err)
        assert code == 2 and err.startswith(f"error: cannot write {named}: "), (argv[0], err)
        assert f"({blocker} is a file)" in err


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fill_the_disk(tmp: Path) -> None:
        tmp.write_text("half a fi")
        raise OSError(errno.ENOSPC, NO_SPACE)

    with pytest.raises(OutputError, match=f"^cannot write {target}: {NO_SPACE}$") as caught:
        atomic_write(target, fill_the_disk)
    assert isinstance(caught.value.__cause__, OSError)  # chained from the OSError
    assert target.read_text() == "old" and _temporaries(tmp_path) == []
    # an OSError about another file (a read inside the writer) is not this write's error
    unreadable = tmp_path / "input.csv"

    def read_something(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(unreadable))

    with pytest.raises(PermissionError):
        atomic_write(target, read_something)
    assert target.read_text() == "old" and _temporaries(tmp_path) == []


def test_cli_last_resort_names_unwritable_files_and_keeps_other_tracebacks(monkeypatch, capsys):
    import densessl.cli as cli

    def raising(exc):
        def command(args):
            raise exc
        return command

    # a library writing its own file onto a full disk: one line
    monkeypatch.setattr(cli, "cmd_builders", raising(
        OSError(errno.ENOSPC, NO_SPACE, "/data/trace.json")))
    assert main(["builders"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert err == f"error: cannot write /data/trace.json: {NO_SPACE}"
    # an I/O error or a missing file is not an unwritable output: its traceback stays
    for exc in (OSError(errno.EIO, "Input/output error", "/data/x.png"),
                FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.png")):
        monkeypatch.setattr(cli, "cmd_builders", raising(exc))
        with pytest.raises(OSError):
            main(["builders"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (chmod 0o555 "
                    "does not stop its writes); the read-only mount tests cover this as root")
def test_permission_denied_is_one_line(tmp_path, capsys):
    weights = _encoder(tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for argv, named in [
            (["export", str(weights), "--to", "torchvision", "--out", str(locked / "x.pt")],
             locked / "x.pt"),
            (["pretrain", SAME_IMAGE, "--out", str(locked / "run"), *sets(RUN)], locked / "run"),
            (["sweep", str(_sweep_file(tmp_path)), "--out", str(locked / "sweep")],
             locked / "sweep"),
        ]:
            assert main(argv) == 2
            err = _one_error(capsys.readouterr().err)
            assert str(named) in err and "Permission denied" in err, err
    finally:
        locked.chmod(0o755)


# --- a full disk and a read-only file system: tmpfs mounts in a private mount namespace --------

def _mount(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)


def _used_kib(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def _call(argv: list[str]) -> dict:
    """``densessl ARGV`` in this process: exit code and stderr (a traceback if it raised)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - what today's code does: report it
            traceback.print_exc()
            code = "raised"
    return {"code": code, "err": err.getvalue()}


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - absent or unreadable
        return None


def _namespace_driver(root: str) -> None:
    """Runs inside the private mount namespace: mounts, runs the CLI, writes results.json."""
    root = Path(root)
    weights = _encoder(root / "weights")
    sweep = _sweep_file(root / "spec")
    results: dict = {}

    # 1. a disk that cannot hold the first checkpoint (saved inside fit, at step 1)
    full4 = root / "full4"
    _mount(full4, "size=4m")
    out = full4 / "run"
    results["first_save"] = {**_call(["pretrain", SAME_IMAGE, "--out", str(out), *sets(
        RUN + ["train.max_steps=2", "train.checkpoint_every=1"])]),
        "temporaries": _temporaries(full4), "out": str(out)}

    # 2. a disk that holds one checkpoint but not a second next to it (the final save)
    full2 = root / "full2"
    _mount(full2, "size=1g")
    out = full2 / "run"
    first = _call(["pretrain", SAME_IMAGE, "--out", str(out), *sets(RUN + ["train.max_steps=1"])])
    ckpt = out / "checkpoints" / "last.ckpt"
    if first["code"] == 0:
        size_kib = _used_kib(full2) + ckpt.stat().st_size // 2048  # + half a checkpoint
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(full2)], check=True)
        second = _call(["pretrain", SAME_IMAGE, "--out", str(out), "--resume",
                        *sets(RUN + ["train.max_steps=2"])])
    else:
        second = {"code": None, "err": ""}
    metrics = json.loads((out / "metrics.json").read_text()) if first["code"] == 0 else {}
    results["second_save"] = {"first": first, **second, "temporaries": _temporaries(full2),
                              "out": str(out), "checkpoint_step": _checkpoint_step(ckpt),
                              "metrics_step": metrics.get("steps")}

    # 3. a full disk under the other commands' outputs
    full = root / "full"
    _mount(full, "size=1m")
    _fill(full)
    results["full"] = {}
    for name, argv, path in [
        ("export", ["export", str(weights), "--to", "torchvision", "--out",
                    str(full / "e.pt")], full / "e.pt"),
        ("inspect-pairs", ["inspect-pairs", SAME_IMAGE, "-n", "1", "--out",
                           str(full / "p.png"), *sets(RUN)], full / "p.png"),
        ("inspect-pairs --json", ["inspect-pairs", SAME_IMAGE, "--cells", "-n", "1", "--json",
                                  str(full / "c.json"), *sets(RUN)], full / "c.json"),
        ("sweep", ["sweep", str(sweep), "--out", str(full / "sweep")],
         full / "sweep" / "numerics.json"),
    ]:
        results["full"][name] = {**_call(argv), "path": str(path)}
    results["full_temporaries"] = _temporaries(full)

    # 4. a read-only file system
    ro = root / "ro"
    _mount(ro, "ro,size=1m")
    results["read_only"] = {}
    for name, argv, path in [
        ("export", ["export", str(weights), "--to", "torchvision", "--out", str(ro / "e.pt")],
         ro / "e.pt"),
        ("pretrain", ["pretrain", SAME_IMAGE, "--out", str(ro / "run"), *sets(RUN)],
         ro / "run"),
        ("run", ["run", SAME_IMAGE, "--out", str(ro / "run"), *sets(RUN)], ro / "run"),
        ("inspect-pairs", ["inspect-pairs", SAME_IMAGE, "-n", "1", "--out", str(ro / "p.png"),
                           *sets(RUN)], ro / "p.png"),
        ("sweep", ["sweep", str(sweep), "--out", str(ro / "sweep")], ro / "sweep"),
    ]:
        results["read_only"][name] = {**_call(argv), "path": str(path)}
    (root / "results.json").write_text(json.dumps(results, indent=1))


def _unshare() -> list[str]:
    return ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


@pytest.fixture(scope="module")
def namespace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("write_failures")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot make a private mount namespace for a small tmpfs")
    probe = subprocess.run([*_unshare(), "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1"',
                            "sh", str(root)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a tmpfs in a private mount namespace is not permitted here: "
                    f"{probe.stderr.strip()}")
    driver = subprocess.run(
        [*_unshare(), sys.executable, "-c", "import sys; from tests.reliability."
         "test_write_failures import _namespace_driver; _namespace_driver(sys.argv[1])",
         str(root)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert driver.returncode == 0, driver.stderr[-5000:]
    return json.loads((root / "results.json").read_text())


def test_disk_full_at_the_first_checkpoint_is_one_line(namespace):
    case = namespace["first_save"]
    assert case["code"] == 2, case["err"][-3000:]
    ckpt = Path(case["out"]) / "checkpoints" / "last.ckpt"
    assert _one_error(case["err"]) == f"error: cannot write {ckpt}: {NO_SPACE}"
    assert case["temporaries"] == []  # not the 4 MB .last.ckpt.tmp


def test_disk_full_keeps_the_previous_checkpoint(namespace):
    case = namespace["second_save"]
    assert case["first"]["code"] == 0, case["first"]["err"][-3000:]
    assert case["code"] == 2, case["err"][-3000:]
    ckpt = Path(case["out"]) / "checkpoints" / "last.ckpt"
    assert _one_error(case["err"]) == f"error: cannot write {ckpt}: {NO_SPACE}"
    assert case["temporaries"] == []
    # step 1's checkpoint, encoder and metrics survive the failed save of step 2, and agree
    assert case["checkpoint_step"] == 1 and case["metrics_step"] == 1


@pytest.mark.parametrize("command", ["export", "inspect-pairs", "inspect-pairs --json", "sweep"])
def test_disk_full_is_one_line_in_every_command(namespace, command):
    case = namespace["full"][command]
    assert case["code"] == 2, case["err"][-3000:]
    assert _one_error(case["err"]) == f"error: cannot write {case['path']}: {NO_SPACE}"
    assert namespace["full_temporaries"] == []


def test_read_only_file_system_is_one_line_in_every_command(namespace):
    assert set(namespace["read_only"]) == {"export", "pretrain", "run", "inspect-pairs", "sweep"}
    for command, case in namespace["read_only"].items():
        assert case["code"] == 2, (command, case["err"][-3000:])
        err = _one_error(case["err"])
        assert case["path"] in err and err.endswith(READ_ONLY), (command, err)
