import json
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_commands_with_descriptions(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("make-sample", "datasets"):
        line = next(x for x in out.splitlines() if x.strip().startswith(command))
        assert len(line.split()) > 2  # has a description
    code, out, _ = run(capsys, "datasets", "--help")
    assert code == 0 and "info" in out and "check" in out and "list" in out


@pytest.mark.parametrize("command", [["make-sample"], ["datasets", "info"],
                                     ["datasets", "check"], ["datasets", "list"], ["pack"]])
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "Usage: pipeline" in out
    if command == ["make-sample"]:
        flat = " ".join(out.split())
        assert "[default: 256]" in flat and "[default: data/deliver-sample]" in flat


def test_console_script_is_installed():
    exe = shutil.which("pipeline") or str(__import__("pathlib").Path(sys.executable).parent
                                           / "pipeline")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "any2seg-pipeline" in result.stdout


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "datasets", "info", "--dataset", "deliver", "--root",
                         str(tmp_path / "missing"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err
    code, _, err = run(capsys, "datasets", "info", "--dataset", "nope", "--root", str(tmp_path))
    # refused while parsing (exit 2, as click does), naming the registered ones
    assert code == 2 and "deliver, mcubes, sample" in err and "Traceback" not in err
    code, _, err = run(capsys, "make-sample", "--bogus")
    assert code == 2 and err.count("\n") == 1 and "--bogus" in err and "--help" in err
    code, _, err = run(capsys, "make-sample", "--size", "abc")
    assert code == 2 and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    from any2seg.errors import DatasetError

    with pytest.raises(DatasetError):
        main(["--debug", "datasets", "info", "--dataset", "deliver", "--root",
              str(tmp_path / "missing")])


def test_make_sample_then_info_json(capsys, tmp_path):
    out_dir = tmp_path / "sample"
    code, out, _ = run(capsys, "make-sample", "--out", str(out_dir), "--size", "64",
                       "--train", "6", "--val", "4", "--test", "2", "--frames-per-scene", "2",
                       "--workers", "1")
    assert code == 0 and "wrote 12 samples" in out and "classes present" in out
    code, out, _ = run(capsys, "make-sample", "--out", str(out_dir), "--size", "64",
                       "--train", "6", "--val", "4", "--test", "2", "--frames-per-scene", "2")
    assert code == 0 and "up to date" in out
    code, out, _ = run(capsys, "datasets", "info", "--dataset", "deliver", "--root",
                       str(out_dir), "--json")
    info = json.loads(out)
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"train": 6, "val": 4,
                                                                    "test": 2}
    assert info["splits"]["train"]["conditions"] == {"cloud": 2, "fog": 2, "night": 2,
                                                     "rain": 0, "sun": 0}
    assert info["splits"]["val"]["cases"]["motionblur"] == 2
    code, out, _ = run(capsys, "datasets", "info", "--dataset", "sample", "--root",
                       str(out_dir))
    assert code == 0 and "train" in out and "0 Building" in out


def test_datasets_check_reports_bad_files(capsys, deliver_root):
    root, _ = deliver_root
    code, out, _ = run(capsys, "datasets", "check", "--dataset", "deliver", "--root", str(root))
    assert code == 0 and "0 bad" in out
    victim = sorted((root / "semantic").rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    missing = sorted((root / "event").rglob("*.png"))[-1]
    missing.unlink()
    code, out, _ = run(capsys, "datasets", "check", "--dataset", "deliver", "--root", str(root))
    assert code == 1 and "2 bad" in out and str(victim) in out and str(missing) in out


def test_datasets_list(capsys):
    code, out, _ = run(capsys, "datasets", "list")
    assert code == 0 and all(n in out for n in ("deliver", "mcubes", "sample"))


def test_datasets_check_covers_every_mcubes_list(capsys, mcubes_root):
    root, _ = mcubes_root
    code, out, _ = run(capsys, "datasets", "check", "--dataset", "mcubes", "--root", str(root))
    assert code == 0 and "checked 5 samples" in out  # val.txt too, not test.txt twice
    code, out, _ = run(capsys, "datasets", "info", "--dataset", "mcubes", "--root", str(root))
    assert code == 0 and "20 classes, 5 samples" in out
