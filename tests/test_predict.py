"""eval/predict.py and dcama/predict.py: which files are queries, and the errors a person sees for bad input,
each one line naming the file, with nothing written. (Predictions themselves: tests/test_own_images.py.)"""

import errno
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcama.flags as flags
from dcama.backbones import BACKBONES
from dcama.checkpoint import CheckpointError, save_checkpoint
from dcama.data import DatasetFileError
from dcama.model import DCAMA
from dcama.predict import InputError, load_model, output_names, query_files, read_support, size_batches
from helpers import exit_status

REPO = Path(__file__).resolve().parents[1]


def predict_cli():
    spec = importlib.util.spec_from_file_location("predict_cli", REPO / "eval" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image(path: Path, height: int = 8, width: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    return path


def mask(path: Path, height: int = 8, width: int = 10, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.zeros((height, width), np.uint8)
    grey[2:5, 3:7] = value
    Image.fromarray(grey).save(path)
    return path


def test_query_files_from_files_folders_and_globs(tmp_path):
    for name in ("img10.jpg", "img2.jpg", "pic.png", "c.PNG", "sub/deep.jpg", "other/x.jpg", "other/y.jpg"):
        image(tmp_path / name)
    for name in ("img2.png", "pic.mask.png"):  # masks beside their images are not queries
        mask(tmp_path / name)
    (tmp_path / "notes.txt").write_text("-")
    found = query_files([tmp_path, str(tmp_path / "other" / "*.jpg"), tmp_path / "img2.jpg", tmp_path / "img2.png"])
    assert found == [str(tmp_path / n) for n in ("c.PNG", "img2.jpg", "img10.jpg", "pic.png", "other/x.jpg",
                                                 "other/y.jpg", "img2.png")]  # a file named explicitly counts
    with pytest.raises(FileNotFoundError, match="query file or folder not found: .*nowhere.jpg"):
        query_files([tmp_path / "nowhere.jpg"])
    with pytest.raises(InputError, match=r"query pattern '.*\*.gif' matches no file"):
        query_files([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="query folder .*empty holds no image files"):
        query_files([tmp_path / "empty"])


def test_output_names_mirror_the_folders_and_never_collide(tmp_path):
    assert output_names([str(tmp_path / "a" / "1.jpg"), str(tmp_path / "b" / "1.jpg")]) == ["a/1", "b/1"]
    assert output_names([str(tmp_path / "x.jpg")]) == ["x"]
    with pytest.raises(InputError, match=r"would write the same mask 1.png"):
        output_names([str(tmp_path / "1.jpg"), str(tmp_path / "1.png")])


def test_batches_hold_one_size():
    sizes = [(5, 6), (7, 8), (5, 6), (5, 6), (7, 8)]
    assert size_batches(sizes, 2) == [[0, 2], [3], [1, 4]]
    assert sorted(sum(size_batches(sizes, 1), [])) == list(range(5))


def test_support_checks(tmp_path):
    img = image(tmp_path / "s.jpg")
    loaded, m = read_support(img, mask(tmp_path / "s.png"))
    assert loaded.size == (10, 8) and m.dtype == np.uint8 and m.sum() == 12
    with pytest.raises(InputError, match=r"mask .*wide.png is 8x12 \(HxW\) but its image .*s.jpg is 8x10"):
        read_support(img, mask(tmp_path / "wide.png", width=12))
    with pytest.raises(InputError, match=r"mask .*ones.png has no foreground pixel \(grey value >= 128\); its "
                                         "largest value is 1: save a 0/1 mask as 0/255"):
        read_support(img, mask(tmp_path / "ones.png", value=1))
    with pytest.raises(InputError, match=r"mask support mask 1 has no foreground pixel \(grey value >= 128\)$"):
        read_support(img, np.zeros((8, 10), bool))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetFileError, match="cannot read image .*bad.jpg"):
        read_support(tmp_path / "bad.jpg", tmp_path / "s.png")


def test_an_unreadable_mask_is_named_once_in_the_folder_benchmarks_words(tmp_path):
    (tmp_path / "afile").write_bytes(b"not an image")
    with pytest.raises(DatasetFileError) as err:
        read_support(image(tmp_path / "s.jpg"), tmp_path / "afile")
    # The reason is the one the folder benchmark's report gives (tests/test_data_folder.py), without the path.
    assert str(err.value) == f"cannot read mask {tmp_path / 'afile'}: not an image file PIL can identify"


@pytest.mark.parametrize("case", ["query", "support", "size", "empty", "checkpoint", "missing-checkpoint", "out",
                                  "no-query"])
def test_cli_errors_are_one_line_naming_the_file_and_write_nothing(case, tmp_path, capsys):
    support, support_mask = image(tmp_path / "s.jpg"), mask(tmp_path / "s.png")
    image(tmp_path / "q" / "q.jpg")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not really a checkpoint")
    out = tmp_path / "out"
    named = {"query": "q/broken.jpg", "support": "s.jpg", "size": "s2.png", "empty": "s2.png",
             "checkpoint": "model.pt", "missing-checkpoint": "absent.pt", "out": "out", "no-query": "nowhere"}[case]
    if case == "query":
        (tmp_path / "q" / "broken.jpg").write_bytes(b"garbage")
    elif case == "support":
        support.write_bytes(b"garbage")
    elif case in ("size", "empty"):
        support_mask = mask(tmp_path / "s2.png", height=9 if case == "size" else 8, value=255 if case == "size" else 0)
    elif case == "missing-checkpoint":
        checkpoint = tmp_path / "absent.pt"
    elif case == "out":
        (out / "masks").mkdir(parents=True)
    args = ["--checkpoint", str(checkpoint), "--support", str(support), str(support_mask),
            "--query", str(tmp_path / ("nowhere" if case == "no-query" else "q")), "--out", str(out), "--no-progress"]
    rc = predict_cli().main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert os.path.join(str(tmp_path), named) in err or (case == "out" and f"--out {out}" in err), err
    assert sorted(p.name for p in out.rglob("*")) == (["masks"] if case == "out" else [])


def test_out_is_checked_once_by_the_engine_before_any_input_is_read(tmp_path, monkeypatch, capsys):
    # predict_files checks --out for its Python callers as well; the command line does not check it again.
    checked = []
    check = flags.output_problem
    monkeypatch.setattr(flags, "output_problem", lambda path, folder: checked.append(path) or check(path, folder))
    support = image(tmp_path / "s.jpg")
    support.write_bytes(b"garbage")  # an input error: the run stops before the checkpoint is read
    (tmp_path / "model.pt").write_bytes(b"")
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--support", str(support), str(mask(tmp_path / "s.png")),
            "--query", str(image(tmp_path / "q.jpg")), "--out", str(tmp_path / "out"), "--no-progress"]
    assert predict_cli().main(args) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert checked == [str(tmp_path / "out")]


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, DCAMA("resnet18", attn_impl="sdpa"))
    return path


NO_CUDA = "--device cuda: this machine has no CUDA device (torch sees none); use --device cpu"
BAD_FLAGS = [
    (["--threads", "-1"], "--threads -1: must be an integer >= 0"),
    (["--device", "bogus"], "--device bogus: choose cpu, cuda or cuda:N"),
    (["--device", "cuda"], NO_CUDA),
    (["--bsz", "0"], "--bsz 0: must be an integer >= 1"),
    (["--img-size", "0"], "--img-size 0: must be an integer >= 1"),
    (["--backbone", "vgg"], "--backbone vgg: choose from " + ", ".join(BACKBONES)),
    (["--backbone", "resnet18", "--img-size", "50"], "--img-size 50: resnet18 takes a side that is a positive "
                                                     "multiple of 32 (its total stride): 32, 64, 96, ..."),
    # Without --backbone: checked against the checkpoint's backbone once it is loaded, before any query.
    (["--img-size", "50"], "--img-size 50: resnet18 takes a side that is a positive multiple of 32 (its total "
                           "stride): 32, 64, 96, ..."),
    (["--out", "{ckpt}/out"], "--out {ckpt}/out: {ckpt} is a file, so nothing can be written under it"),
    (["--out", "{ckpt}"], "--out {ckpt}: is a file, not a folder"),
    (["--checkpoint", "{tmp}"], "--checkpoint {tmp}: is a folder, not a file; it holds model.pt: pass one of them"),
    (["--fold", "1"], "unrecognized arguments: --fold 1 (--help lists the flags)"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_cli_bad_flag_is_one_line_naming_it(argv, message, resnet18_checkpoint, tmp_path, capsys):
    if message == NO_CUDA and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    (tmp_path / "model.pt").write_bytes(resnet18_checkpoint.read_bytes())

    def fill(text):
        return text.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(resnet18_checkpoint))

    args = ["--checkpoint", str(resnet18_checkpoint), "--support", str(image(tmp_path / "s.jpg")),
            str(mask(tmp_path / "s.png")), "--query", str(image(tmp_path / "q" / "q.jpg")),
            "--out", str(tmp_path / "out"), "--attn-impl", "sdpa", "--no-progress", *map(fill, argv)]
    assert exit_status(predict_cli().main, args) == 2
    assert capsys.readouterr().err == f"error: {fill(message)}\n"
    assert not (tmp_path / "out").exists()


def test_outputs_that_cannot_be_written_are_one_line(resnet18_checkpoint, tmp_path, capsys, monkeypatch):
    # A full disk while the masks are written (past the checks made before): the path and the system's reason.
    def full_disk(path, picture):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")

    monkeypatch.setattr("dcama.predict.save_picture", full_disk)
    args = ["--checkpoint", str(resnet18_checkpoint), "--support", str(image(tmp_path / "s.jpg")),
            str(mask(tmp_path / "s.png")), "--query", str(image(tmp_path / "q" / "q.jpg")),
            "--out", str(tmp_path / "out"), "--img-size", "32", "--attn-impl", "sdpa", "--no-progress"]
    assert predict_cli().main(args) == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'out' / 'masks' / 'q.png'}: No space left " \
                                      "on device\n"


def test_load_model_reads_the_checkpoint_once(resnet18_checkpoint, monkeypatch):
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or load(*a, **kw))
    model, side = load_model(resnet18_checkpoint, attn_impl="sdpa", device="cpu")
    assert reads == [str(resnet18_checkpoint)] and side == 384  # no recorded size: the published one
    assert not model.training


def test_from_python_the_errors_name_the_arguments(resnet18_checkpoint):
    """Worded for the caller: `device='cuda'`, not the command line's `--device cuda` (which the command adds)."""
    with pytest.raises(flags.ConfigError, match=r"^device='bogus': choose cpu, cuda or cuda:N$"):
        load_model(resnet18_checkpoint, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(flags.ConfigError, match=r"^device='cuda': this machine has no CUDA device \(torch sees "
                                                    r"none\); use device='cpu'$"):
            load_model(resnet18_checkpoint, device="cuda")
    for load in (load_model, DCAMA.from_checkpoint):
        with pytest.raises(CheckpointError, match=r"holds a resnet18 model, not the swin_b backbone asked for$"):
            load(resnet18_checkpoint, backbone="swin_b")


def test_device_is_checked_before_any_input_is_read(resnet18_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(resnet18_checkpoint), "--support", str(tmp_path / "missing.jpg"),
            str(tmp_path / "missing.png"), "--query", str(tmp_path / "missing-too.jpg"), "--out", str(tmp_path / "out"),
            "--device", "bogus", "--no-progress"]
    assert exit_status(predict_cli().main, args) == 2
    assert capsys.readouterr().err == "error: --device bogus: choose cpu, cuda or cuda:N\n"
