"""Output files of every writing command: only regular files (or new names) are written, never a
device, FIFO or one of the run's inputs; a folder that cannot be written is refused before any
work starts (issue 16, items 1 and 4).

Every case runs ``qdiff.cli.main`` on the tiny models (real onnxruntime quantizer). The checks
happen before the models run, so a refused case is fast; a case that is not refused runs the
command and its assertions show what it clobbered.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyModels, assert_one_line_error, run_cli, write_npz

from qdiff._io import write_atomic
from qdiff.errors import UsageError


def _calib(d: Path) -> str:
    return write_npz(d / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))


def _config(m: TinyModels, d: Path) -> str:
    from qdiff.config import save_config
    from qdiff._quantize import init_config

    path = d / "cfg.json"
    save_config(init_config(m.float), path)
    return str(path)


#: command -> (models, scratch folder, output path) -> argv; one case per output option
WRITERS: dict[str, Callable[[TinyModels, Path, str], list[str]]] = {
    "compare --json": lambda m, d, o: ["compare", m.float, m.qdq, "--json", o],
    "compare --csv": lambda m, d, o: ["compare", m.float, m.qdq, "--csv", o],
    "compare --html": lambda m, d, o: ["compare", m.float, m.qdq, "--html", o],
    "compare --node-data": lambda m, d, o: ["compare", m.float, m.qdq, "--node-data", o],
    "sensitivity --json": lambda m, d, o: ["sensitivity", m.float, m.qdq, "--no-gain", "--json", o],
    "sensitivity --csv": lambda m, d, o: ["sensitivity", m.float, m.qdq, "--no-gain", "--csv", o],
    "sensitivity --html": lambda m, d, o: ["sensitivity", m.float, m.qdq, "--no-gain", "--html", o],
    "match -o": lambda m, d, o: ["match", m.float, m.qdq, "-o", o],
    "diagnose --json": lambda m, d, o: ["diagnose", m.qdq, m.float, "--json", o],
    "profile --json": lambda m, d, o: ["profile", m.float, m.qdq, "--samples", "1", "--warmup", "0", "--json", o],
    "profile --csv": lambda m, d, o: ["profile", m.float, m.qdq, "--samples", "1", "--warmup", "0", "--csv", o],
    "quantize -o": lambda m, d, o: ["quantize", m.float, "--calib", _calib(d), "-o", o],
    "config init -o": lambda m, d, o: ["config", "init", m.float, "-o", o],
    "calib-sweep -o": lambda m, d, o: ["calib-sweep", m.float, "--calib", _calib(d), "--samples", "2", "-o", o],
    "export -o": lambda m, d, o: ["export", _config(m, d), "--to", "ort", "-o", o],
    "fallback --html": lambda m, d, o: [
        "fallback", m.float, "--calib", _calib(d), "--target", "cosine>=0.5", "-o", str(d / "fb"), "--html", o,
    ],
}  # fmt: skip


def _name(case: str) -> str:
    return "out.json" if case.startswith("match") else "out"


@pytest.mark.parametrize("case", list(WRITERS))
def test_output_onto_a_fifo_is_refused_and_the_fifo_kept(case, tiny_models, tmp_path, capfd):
    fifo = tmp_path / _name(case)
    os.mkfifo(fifo)
    rc, out, err = run_cli(WRITERS[case](tiny_models, tmp_path, str(fifo)), capfd)
    assert_one_line_error(rc, err, str(fifo), "FIFO", "regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("case", list(WRITERS))
def test_output_onto_a_link_to_a_fifo_is_refused(case, tiny_models, tmp_path, capfd):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / _name(case)
    link.symlink_to(fifo)
    rc, out, err = run_cli(WRITERS[case](tiny_models, tmp_path, str(link)), capfd)
    assert_one_line_error(rc, err, "link", "FIFO")
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
@pytest.mark.parametrize("case", ["compare --json", "match -o", "quantize -o", "export -o"])
def test_output_onto_a_device_is_refused_and_the_device_kept(case, tiny_models, tmp_path, capfd):
    dev = tmp_path / _name(case)  # a private copy of /dev/null: the real one is never at risk
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    rc, out, err = run_cli(WRITERS[case](tiny_models, tmp_path, str(dev)), capfd)
    assert_one_line_error(rc, err, "device")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_output_through_a_link_writes_its_target_and_keeps_the_link(tiny_models, tmp_path, capfd):
    target = tmp_path / "results" / "run1.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--json", str(link)], capfd)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert '"layers"' in target.read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["run1.json"]  # no temporary file left


INPUT_AS_OUTPUT: dict[str, Callable[[TinyModels, Path], tuple[list[str], str]]] = {
    "compare --json QUANT": lambda m, d: (["compare", m.float, m.qdq, "--json", m.qdq], m.qdq),
    "compare --csv FLOAT": lambda m, d: (["compare", m.float, m.qdq, "--csv", m.float], m.float),
    "compare --json DATA": lambda m, d: (["compare", m.float, m.qdq, "--data", _calib(d), "--json", str(d / "calib.npz")], str(d / "calib.npz")),
    "sensitivity --csv QUANT": lambda m, d: (["sensitivity", m.float, m.qdq, "--csv", m.qdq], m.qdq),
    "match -o (link to FLOAT)": lambda m, d: (["match", m.float, m.qdq, "-o", _link(m.float, d / "f.json")], m.float),
    "diagnose --json FLOAT": lambda m, d: (["diagnose", m.qdq, m.float, "--json", m.float], m.float),
    "profile --csv QUANT": lambda m, d: (["profile", m.float, m.qdq, "--csv", m.qdq], m.qdq),
    "quantize -o FLOAT": lambda m, d: (["quantize", m.float, "--calib", _calib(d), "-o", m.float], m.float),
    "config init -o FLOAT": lambda m, d: (["config", "init", m.float, "-o", m.float], m.float),
    "calib-sweep -o CALIB": lambda m, d: (["calib-sweep", m.float, "--calib", _calib(d), "-o", str(d / "calib.npz")], str(d / "calib.npz")),
    "export -o CONFIG": lambda m, d: (["export", _config(m, d), "--to", "ort", "-o", str(d / "cfg.json")], str(d / "cfg.json")),
}  # fmt: skip


def _link(target: str, link: Path) -> str:
    link.symlink_to(target)
    return str(link)


@pytest.mark.parametrize("case", list(INPUT_AS_OUTPUT))
def test_output_that_is_an_input_file_is_refused_and_the_input_kept(case, tiny_models, tmp_path, capfd):
    argv, victim = INPUT_AS_OUTPUT[case](tiny_models, tmp_path)
    before = Path(victim).read_bytes()
    rc, out, err = run_cli(argv, capfd)
    assert_one_line_error(rc, err, "input file")
    assert Path(victim).read_bytes() == before


def test_two_outputs_naming_one_file_are_refused(tiny_models, tmp_path, capfd):
    o = str(tmp_path / "r.out")
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--json", o, "--csv", o], capfd)
    assert_one_line_error(rc, err, "--json", "--csv", "both")
    assert not Path(o).exists()


def test_fallback_outdir_files_must_be_regular(tiny_models, tmp_path, capfd):
    outdir = tmp_path / "fb"
    outdir.mkdir()
    os.mkfifo(outdir / "history.csv")
    rc, out, err = run_cli(
        ["fallback", tiny_models.float, "--calib", _calib(tmp_path), "--target", "cosine>=0.5", "-o", str(outdir)], capfd
    )
    assert_one_line_error(rc, err, "history.csv", "FIFO")
    assert stat.S_ISFIFO(os.lstat(outdir / "history.csv").st_mode)
    assert sorted(p.name for p in outdir.iterdir()) == ["history.csv"]


def test_write_atomic_refuses_special_files_itself(tmp_path):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="FIFO"):
        write_atomic(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


# -- item 4: folders that cannot be written, found before the run ---------------------------------


def _unwritable_kinds(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (an output path whose folder cannot be written, a keyword of the error)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {
        "parent is a file": (str(afile / "out.json"), "not a folder"),
        "missing folder": (str(tmp_path / "no_such_dir" / "out.json"), "does not exist"),
    }


@pytest.mark.parametrize("case", list(WRITERS))
@pytest.mark.parametrize("kind", ["parent is a file", "missing folder"])
def test_output_folder_that_cannot_be_written_is_refused_before_the_run(case, kind, tiny_models, tmp_path, capfd):
    path, keyword = _unwritable_kinds(tmp_path)[kind]
    before = set(tmp_path.rglob("*"))
    rc, out, err = run_cli(WRITERS[case](tiny_models, tmp_path, path), capfd)
    assert_one_line_error(rc, err, keyword)
    created = {p for p in set(tmp_path.rglob("*")) - before if p.name not in ("calib.npz", "cfg.json")}
    assert not created, created
    assert out == ""  # refused before the run: no table printed


def _sysfs_refuses_root() -> bool:
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir="/sys")
    except OSError:
        return os.path.isdir("/sys")
    os.close(fd)
    os.unlink(tmp)
    return False


@pytest.mark.skipif(not _sysfs_refuses_root(), reason="needs a Linux /sys that refuses new files")
@pytest.mark.parametrize("case", ["compare --json", "sensitivity --csv", "diagnose --json", "profile --csv", "quantize -o"])
def test_folder_that_refuses_files_even_to_root_is_found_up_front(case, tiny_models, tmp_path, capfd):
    """/sys refuses new files to everyone, root included (the tests run as root, for whom
    permission bits mean nothing): the real file-creation probe finds it, a mode check would not."""
    ok = tmp_path / "ok.out"
    argv = WRITERS[case](tiny_models, tmp_path, "/sys/qdiff-out")
    other = {"compare": "--csv", "sensitivity": "--json", "profile": "--json"}.get(argv[0])
    if other and other not in argv:
        argv += [other, str(ok)]
    rc, out, err = run_cli(argv, capfd)
    assert_one_line_error(rc, err, "/sys", "cannot create a file")
    assert not ok.exists()  # the other output is not written either: nothing ran
    assert not os.path.exists("/sys/qdiff-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (covered by the /sys test above)")
def test_read_only_folder_is_refused_up_front(tiny_models, tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--json", str(ro / "r.json")], capfd)
    finally:
        ro.chmod(0o755)
    assert_one_line_error(rc, err, "cannot create a file")
