"""Writing files safely: one writer for every output, destinations checked before any work.

Each test names the behaviour it replaced ("used to ...").
"""

from __future__ import annotations

import ast
import os
import socket
import stat

import pytest
import torch

import mixquant
from conftest import make_small_net
from mixquant.cli import main
from mixquant.io import files
from mixquant.io.files import check_destination, read_regular, write_bytes_atomic, write_text_atomic

PKG_DIR = os.path.dirname(mixquant.__file__)


# ------------------------------------------------- non-regular destinations --
def _special_files(tmp_path):
    """A FIFO, a socket, a directory and (as root) a character device, each at a would-be output path."""
    made = {}
    os.mkfifo(tmp_path / "fifo")
    made["fifo"] = (tmp_path / "fifo", stat.S_ISFIFO)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "sock"))
    sock.close()
    made["socket"] = (tmp_path / "sock", stat.S_ISSOCK)
    (tmp_path / "dir").mkdir()
    made["directory"] = (tmp_path / "dir", stat.S_ISDIR)
    if os.geteuid() == 0:  # a null device of our own: never the real /dev/null
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made["char device"] = (tmp_path / "null", stat.S_ISCHR)
    return made


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_regular_destinations_are_refused(tmp_path, overwrite):
    # Used to: with overwrite, a FIFO (and, as root, a device node) was replaced by a regular file.
    for kind, (path, is_kind) in _special_files(tmp_path).items():
        with pytest.raises(ValueError, match="exists and is a"):
            write_bytes_atomic(path, b"payload", overwrite=overwrite)
        assert is_kind(os.lstat(path).st_mode), kind
    assert not [p for p in os.listdir(tmp_path) if p.startswith(files.TEMP_PREFIX)]


def test_cli_refuses_special_outputs_with_one_line(tmp_path, capsys):
    # Used to: `search --out FIFO --overwrite` replaced the FIFO; `--out DIR` said "exists, pass --overwrite".
    for kind, (path, is_kind) in _special_files(tmp_path).items():
        for extra in ([], ["--overwrite"]):
            rc = main(["search", "conftest:make_small_net", "--qem", "4", "--out", str(path)] + extra)
            err = capsys.readouterr().err
            assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (kind, err)
            assert "exists and is a" in err, (kind, err)
            assert is_kind(os.lstat(path).st_mode), kind


# ----------------------------------------------------------- temporaries ----
def test_temporary_names_are_unpredictable_and_never_followed(tmp_path, monkeypatch):
    # Used to (evaluate --json): a symlink planted at the fixed name OUT.tmp was followed and its target
    # overwritten. Here the attacker even knows the first name the writer will draw.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    names = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    planted = tmp_path / f"{files.TEMP_PREFIX}aaaaaaaaaaaaaaaa{files.TEMP_SUFFIX}"
    planted.symlink_to(victim)
    write_text_atomic(tmp_path / "out.json", "new")
    assert victim.read_text() == "precious" and planted.is_symlink()
    assert (tmp_path / "out.json").read_text() == "new"
    assert not (tmp_path / f"{files.TEMP_PREFIX}bbbbbbbbbbbbbbbb{files.TEMP_SUFFIX}").exists()


def test_evaluate_json_ignores_a_planted_tmp_symlink(tmp_path, capsys):
    # Used to: `evaluate --json res.json` wrote through a symlink planted at res.json.tmp.
    model = make_small_net()
    mixquant.export(mixquant.quantize(model, mixquant.uniform(model, 4), progress=False), tmp_path / "q.safetensors")
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "x.pt")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "res.json.tmp").symlink_to(victim)
    assert main(["evaluate", "conftest:make_small_net", str(tmp_path / "q.safetensors"), "--data",
                 str(tmp_path / "x.pt"), "--json", str(tmp_path / "res.json")]) == 0
    assert victim.read_text() == "precious" and (tmp_path / "res.json.tmp").is_symlink()
    assert '"agreement"' in (tmp_path / "res.json").read_text()


def test_experiment_writers_use_the_atomic_writer(tmp_path):
    # Used to: results.json, RESULTS.md and the plots were written through fixed OUT.tmp names or directly.
    from mixquant.experiments import report, runner

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("results.json.tmp", "RESULTS.md.tmp"):
        (tmp_path / name).symlink_to(victim)
    results = {"meta": {"scale": "quick", "seeds": [0], "models": [], "methods": []}, "models": {}, "records": []}
    runner.save_results(results, str(tmp_path / "results.json"))
    report.write_report(results, str(tmp_path), plots=False)
    assert victim.read_text() == "precious"
    assert runner.load_results(str(tmp_path / "results.json")) == results


def _writes_outside_the_writer():
    """Calls in the package that write a file by path other than through mixquant.io.files."""
    found = []
    for root, _, names in os.walk(PKG_DIR):
        for name in names:
            path = os.path.join(root, name)
            if not name.endswith(".py") or os.path.relpath(path, PKG_DIR) == os.path.join("io", "files.py"):
                continue
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                label = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords
                                                                     if k.arg == "mode"), None)
                writes_open = label == "open" and isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+")
                if writes_open or label in ("replace", "rename", "write_text", "write_bytes", "savefig"):
                    target = node.args[0] if node.args else None
                    if label == "savefig" and isinstance(target, ast.Name) and target.id == "buf":
                        continue  # rendered to memory, then written by the writer
                    if label == "replace" and not (isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "os"):
                        continue  # str.replace / dataclasses.replace
                    found.append(f"{os.path.relpath(path, PKG_DIR)}:{node.lineno} {label}")
    return found


def test_every_file_is_written_by_the_one_writer():
    # Used to: five modules had their own open(..., "w") / os.replace / savefig writes.
    assert _writes_outside_the_writer() == []


# ------------------------------------------- destinations checked up front --
def _fail_if_called(*args, **kwargs):
    raise AssertionError("the work started before the output path was checked")


@pytest.mark.parametrize("case", ["missing folder", "under a file", "a directory", "exists", "unwritable"])
def test_bad_destinations_are_found_before_the_work(tmp_path, capsys, monkeypatch, case):
    # Used to: `quantize --method brecq --out /missing/q.safetensors` ran the whole reconstruction, then
    # failed naming a temporary file; `--out` under a file was a NotADirectoryError traceback.
    if case == "unwritable" and os.geteuid() == 0:
        pytest.skip("root writes into any folder")
    (tmp_path / "file").write_text("x")
    (tmp_path / "exists.json").write_text("precious")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    out = {"missing folder": tmp_path / "missing" / "q.out", "under a file": tmp_path / "file" / "q.out",
           "a directory": tmp_path, "exists": tmp_path / "exists.json", "unwritable": ro / "q.out"}[case]
    import mixquant.api.quantize as api_quantize
    import mixquant.api.search as api_search
    import mixquant.cli.evaluate_cmd as evaluate_cmd

    monkeypatch.setattr(api_search, "search", _fail_if_called)
    monkeypatch.setattr(api_quantize, "quantize", _fail_if_called)
    monkeypatch.setattr(evaluate_cmd, "evaluate_files", _fail_if_called)
    mixquant.uniform(make_small_net(), 4).save(tmp_path / "u.json")
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "x.pt")
    commands = [
        ["search", "conftest:make_small_net", "--qem", "4", "--out", str(out)],
        ["quantize", "conftest:make_small_net", "--config", str(tmp_path / "u.json"), "--method", "brecq",
         "--calib", str(tmp_path / "x.pt"), "--out", str(out)],
        ["evaluate", "conftest:make_small_net", str(tmp_path / "q.safetensors"), "--data", str(tmp_path / "x.pt"),
         "--json", str(out)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(out) in err and files.TEMP_PREFIX not in err, err  # names the user's path, not a temporary
    assert (tmp_path / "exists.json").read_text() == "precious"


def test_check_destination_accepts_what_it_should(tmp_path):
    assert check_destination(tmp_path / "new.json") == str(tmp_path / "new.json")
    (tmp_path / "old.json").write_text("x")
    check_destination(tmp_path / "old.json", overwrite=True)
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere")  # a dangling link: replaced only with overwrite
    with pytest.raises(FileExistsError):
        check_destination(tmp_path / "link.json")
    check_destination(tmp_path / "link.json", overwrite=True)
    with pytest.raises(ValueError):
        check_destination("")


# ------------------------------------------------------------ reading -------
def test_read_regular_never_blocks_on_a_fifo(tmp_path):
    # Used to: load_quantized (and `evaluate MODEL FIFO`) opened a FIFO and waited forever for a writer.
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", tmp_path, "/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_regular(path, 1 << 20)
    with pytest.raises(ValueError, match="larger than any thing"):
        (tmp_path / "big").write_bytes(b"x" * 11)
        read_regular(tmp_path / "big", 10, "thing")
    assert read_regular(tmp_path / "big", 11) == b"x" * 11


def test_demo_and_experiment_outputs_are_checked_first(tmp_path, capsys, monkeypatch):
    # Used to: the demo checked only for an existing report; `--out` under a file failed after the work.
    from mixquant import zoo

    monkeypatch.setattr(zoo, "mobilenet_v2", _fail_if_called)
    (tmp_path / "file").write_text("x")
    fifo_dir = tmp_path / "rep"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "report.md")
    for argv in (["demo", "--quick", "--out", str(tmp_path / "file" / "r")],
                 ["demo", "--quick", "--out", str(tmp_path / "missing" / "r")],
                 ["demo", "--quick", "--out", str(fifo_dir), "--overwrite"],
                 ["experiment", "--quick", "--no-plots", "--out", str(tmp_path / "file")],
                 ["experiment", "--quick", "--no-plots", "--out", str(tmp_path / "missing" / "r")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert stat.S_ISFIFO(os.lstat(fifo_dir / "report.md").st_mode)


@pytest.mark.parametrize("entry", ["text.jpg", "fifo.png", "truncated.png"])
def test_calib_folder_with_a_bad_entry_is_one_line(tmp_path, capsys, entry):
    # Used to: a PIL UnidentifiedImageError traceback, or a hang on a FIFO. (A subfolder is a class
    # folder, not a bad entry: tests/test_cli_firsthour.py holds that layout.)
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    folder.mkdir()
    pil.new("RGB", (40, 30), (200, 10, 10)).save(folder / "ok.png")
    if entry == "text.jpg":
        (folder / entry).write_text("not an image")
    elif entry == "fifo.png":
        os.mkfifo(folder / entry)
    else:
        (folder / entry).write_bytes((folder / "ok.png").read_bytes()[:60])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    mixquant.uniform(make_small_net(), 8).save(tmp_path / "u.json")
    rc = main(["quantize", "conftest:make_small_net", "--config", str(tmp_path / "u.json"), "--act-bits", "8",
               "--calib", str(folder), "--image-size", "16", "--out", str(tmp_path / "q.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(folder / entry) in err and not (tmp_path / "q.safetensors").exists()
    (folder / entry).unlink()
    assert main(["quantize", "conftest:make_small_net", "--config", str(tmp_path / "u.json"), "--act-bits", "8",
                 "--calib", str(folder), "--image-size", "16", "--out", str(tmp_path / "q.safetensors")]) == 0


def test_cli_evaluate_of_a_fifo_is_one_line(tmp_path, capsys):
    # Used to: `mixquant evaluate MODEL FIFO` waited forever for a writer.
    import signal

    os.mkfifo(tmp_path / "q.safetensors")
    torch.save(torch.randn(2, 3, 16, 16), tmp_path / "x.pt")

    def hung(signum, frame):
        raise AssertionError("evaluate blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        rc = main(["evaluate", "conftest:make_small_net", str(tmp_path / "q.safetensors"), "--data",
                   str(tmp_path / "x.pt")])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert rc == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1


def test_concatenate_into_never_follows_or_replaces(tmp_path):
    from mixquant.io.files import concatenate_into

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"12")
    b.write_bytes(b"345")
    concatenate_into([str(a), str(b)], tmp_path / "ab", chunk=1)
    assert (tmp_path / "ab").read_bytes() == b"12345"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "planted").symlink_to(victim)
    for dest in (tmp_path / "planted", tmp_path / "ab"):
        with pytest.raises(FileExistsError):
            concatenate_into([str(a)], dest)
    assert victim.read_text() == "precious" and (tmp_path / "ab").read_bytes() == b"12345"


def test_publish_folder_keeps_the_first(tmp_path):
    from mixquant.io.files import publish_folder

    first, second = tmp_path / "one", tmp_path / "two"
    for d, text in ((first, "1"), (second, "2")):
        d.mkdir()
        (d / "f").write_text(text)
    final = tmp_path / "final"
    assert publish_folder(first, final) == str(final) and (final / "f").read_text() == "1"
    publish_folder(second, final)  # another process was faster: ours is dropped
    assert (final / "f").read_text() == "1" and not second.exists()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    third = tmp_path / "three"
    third.mkdir()
    with pytest.raises(ValueError, match="not a folder"):
        publish_folder(third, tmp_path / "link")
