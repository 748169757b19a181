"""Every mistake a user can make on the command line is one line on stderr and exit status 2, found
before a model is loaded (a model path that does not exist proves nothing was loaded: the check came first)."""

import pytest
from PIL import Image

from attnlens.cli import main

NO_MODEL = "/nonexistent/model-folder"  # loading it would fail with another message


def run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


@pytest.mark.parametrize("argv, says", [
    (["capture", "--prompt", "a red star", "--word", "star", "--out", "{missing}/heat.png"], "does not exist"),
    (["capture", "--prompt", "a red star", "--word", "star", "--out", "{tmp}"], "is a folder"),
    (["capture", "--prompt", "a red star", "--word", "star", "--out", "{tmp}/heat.xyz"], "not an image format"),
    (["capture", "--prompt", "a red star", "--word", "star", "--out", "{tmp}/heat"], "no extension"),
    (["edit", "--source", "a red star", "--target", "a blue star", "--out", "{file}"], "existing file"),
    (["edit", "--source", "a red star", "--target", "a blue star", "--out", "{missing}/edits"], "does not exist"),
    (["edit", "--image", "{missing}/photo.png", "--target", "a blue star", "--out", "{tmp}/e"], "no such file"),
    (["edit", "--image", "{tmp}", "--target", "a blue star", "--out", "{tmp}/e"], "is a folder"),
    (["edit", "--image", "{file}", "--target", "a blue star", "--out", "{tmp}/e"], "not an image"),
    (["edit", "--target", "a blue star", "--out", "{tmp}/e"], "needs --source"),
    (["edit", "--source", "a", "--target", "b", "--method", "fpee", "--out", "{tmp}/e"], "valid: fpe"),
    (["edit", "--source", "a", "--target", "b", "--option", "noequals", "--out", "{tmp}/e"], "NAME=VALUE"),
    (["shapesedit", "--methods", "fpe,bogus", "--out", "{tmp}/s"], "bogus is not an editing method"),
    (["shapesedit", "--kinds", "colour,texture", "--out", "{tmp}/s"], "texture is not a kind"),
    (["shapesedit", "--out", "{file}"], "existing file"),
    (["--device", "cuda:99", "layers"], "cuda"),
    (["--device", "tpu", "layers"], "valid"),
])
def test_user_mistakes_are_one_line_errors_before_loading(tmp_path, capsys, argv, says):
    afile = tmp_path / "notes.txt"
    afile.write_text("the user's notes")
    fill = {"missing": str(tmp_path / "no-such-dir"), "tmp": str(tmp_path), "file": str(afile)}
    argv = [a.format(**fill) for a in argv]
    if argv[0] != "--device":
        argv = argv[:1] + ["--model", NO_MODEL] + argv[1:] if argv[0] != "layers" else argv
    code, err = run(capsys, argv)
    assert code == 2
    assert says in err, err
    assert err.startswith("attnlens: error:") and err.count("\n") == 1
    assert afile.read_text() == "the user's notes"  # nothing the user wrote is lost


@pytest.mark.parametrize("argv, says", [
    (["capture", "--prompt", "a", "--word", "a", "--steps", "0"], "--steps must be at least 1"),
    (["capture", "--prompt", "a", "--word", "a", "--steps", "-1"], "--steps must be at least 1"),
    (["capture", "--prompt", "a", "--word", "a", "--steps", "2.5"], "whole number"),
    (["edit", "--source", "a", "--target", "b", "--guidance", "nan"], "--guidance must be"),
    (["edit", "--source", "a", "--target", "b", "--guidance", "-1"], "--guidance must be"),
    (["shapesedit", "--seeds", "0"], "--seeds must be at least 1"),
])
def test_bad_numbers_are_usage_errors(capsys, argv, says):
    code, err = run(capsys, argv)
    assert code == 2 and says in err, err


def test_a_readable_image_passes_the_input_check(tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    code, err = run(capsys, ["edit", "--model", NO_MODEL, "--image", str(img), "--target", "a blue star",
                             "--out", str(tmp_path / "edits")])
    assert code == 2 and "--image" not in err  # got as far as loading the (missing) model
