"""eval/predict.py with several classes (--support CLASS IMAGE MASK): which class a pixel gets, that the
cached support features give what whole episodes through the model give, the label maps, legends and
overlays it writes; and the support pairs that look swapped (one line: an error or a warning)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcama.checkpoint import save_checkpoint
from dcama.data.common import preprocess_image
from dcama.model import DCAMA, resize_logits
from dcama.predict import (InputError, SupportSet, SupportWarning, _support_panels, class_margins, encode_classes,
                           label_map, read_support, segment, segment_classes, support_classes)
from dcama.visualize import class_styles
from helpers import exit_status, randomise_

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def predict_cli():
    spec = importlib.util.spec_from_file_location("predict_cli", REPO / "eval" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def picture(path: Path, seed: int, height: int = 40, width: int = 56) -> Path:
    """A noisy RGB picture (a photo's many grey levels), so no swap check fires on it."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def box_mask(path: Path, box: tuple[int, int, int, int], height: int = 40, width: int = 56) -> Path:
    grey = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    grey[top:bottom, left:right] = 255
    Image.fromarray(grey).save(path)
    return path


@pytest.fixture(scope="module")
def model(files: dict) -> DCAMA:
    """A random model whose foreground bias is set to the median margin of the test's queries, so that its
    masks are neither empty nor full."""
    torch.manual_seed(0)
    net = randomise_(DCAMA("resnet18", attn_impl="sdpa")).eval()
    margins = class_margins(net, encode_classes(net, read_classes(files), SIZE), queries(files), SIZE)
    with torch.no_grad():
        net.head.mixer3[-1].bias[1] -= margins.median()
    return net


def read_classes(files: dict) -> list:
    return [(name, [read_support(i, m) for i, m in pairs]) for name, pairs in support_classes(files["supports"])]


def queries(files: dict) -> list[Image.Image]:
    return [Image.open(q).convert("RGB") for q in files["queries"]]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("nway")
    supports = [("cat", picture(tmp / "s0.png", 0), box_mask(tmp / "s0.mask.png", (5, 5, 30, 30))),
                ("dog", picture(tmp / "s1.png", 1), box_mask(tmp / "s1.mask.png", (10, 20, 35, 50))),
                ("cat", picture(tmp / "s2.png", 2), box_mask(tmp / "s2.mask.png", (0, 0, 20, 40)))]
    queries = [picture(tmp / "q" / f"q{i}.png", 10 + i) for i in range(3)]
    return {"supports": [tuple(map(str, s)) for s in supports], "queries": [str(q) for q in queries], "tmp": tmp}


def test_classes_in_the_order_first_given_with_their_shots() -> None:
    classes = support_classes([("cat", "a", "am"), ("dog", "b", "bm"), ("cat", "c", "cm")])
    assert classes == [("cat", [("a", "am"), ("c", "cm")]), ("dog", [("b", "bm")])]
    assert support_classes([("a", "am"), ("b", "bm")]) == [("foreground", [("a", "am"), ("b", "bm")])]
    with pytest.raises(InputError, match="all .image, mask. pairs .one class. or all .class name, image, mask."):
        support_classes([("a", "am"), ("cat", "b", "bm")])
    with pytest.raises(InputError, match="class name 'background': choose a non-empty name other than"):
        support_classes([("background", "a", "am")])


def test_label_map_argmax_against_background() -> None:
    # Per pixel, the margins (foreground logit - background logit) of classes 1 and 2.
    margins = torch.tensor([[[[2.0, -1.0, 0.5, 0.0, 3.0]], [[1.0, -2.0, 0.5, -1.0, 3.5]]]])
    # Class 1 best; no class beats its background; a tie goes to the first given; a margin of exactly 0 is
    # background (the 1-way argmax of two equal logits is 0); class 2 best.
    assert label_map(margins).tolist() == [[[1, 0, 1, 0, 2]]]


def test_cached_supports_give_what_whole_episodes_give(model: DCAMA, files: dict) -> None:
    """class_margins (each support set through the backbone once, the queries once for all classes) against
    DCAMA.forward on whole episodes, class by class."""
    classes = read_classes(files)
    got = class_margins(model, encode_classes(model, classes, SIZE), queries(files), SIZE)
    assert got.shape == (3, 2, 40, 56)
    query = torch.stack([preprocess_image(q, SIZE) for q in queries(files)])
    for c, (_, pairs) in enumerate(classes):
        shots = SupportSet.build(pairs, SIZE)
        with torch.no_grad():
            logits = model(query, shots.images.expand(3, -1, -1, -1, -1), shots.masks.expand(3, -1, -1, -1))
        logits = resize_logits(logits, (40, 56))
        torch.testing.assert_close(got[:, c], logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-4)
    # One class: exactly the 1-way masks (DCAMA.predict's argmax), whatever the form.
    one_way = segment(model, [s[1:] for s in files["supports"][:1]], files["queries"], img_size=SIZE)
    labels = segment_classes(model, files["supports"][:1], files["queries"], img_size=SIZE, batch_size=2)
    assert all(np.array_equal(m, lab == 1) for m, lab in zip(one_way, labels))
    assert 0 < np.mean([m.mean() for m in one_way]) < 1


def test_cli_writes_label_maps_legends_and_overlays(model: DCAMA, files: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    save_checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--query", str(Path(files["queries"][0]).parent),
            "--out", str(out), "--img-size", str(SIZE), "--bsz", "2", "--attn-impl", "sdpa", "--no-progress"]
    for support in files["supports"]:
        args += ["--support", *support]
    assert predict_cli().main(args) == 0
    assert capsys.readouterr().out.startswith(f"3 label maps in {out / 'labels'}, overlays in")
    expected = segment_classes(model, files["supports"], files["queries"], img_size=SIZE)
    result = json.loads((out / "predictions.json").read_text())
    assert result["settings"]["classes"] == ["cat", "dog"]
    for query, labels, record in zip(files["queries"], expected, result["queries"]):
        name = Path(query).stem
        with Image.open(out / "labels" / f"{name}.png") as written:
            assert written.mode == "L" and np.array_equal(np.asarray(written), labels)
        legend = json.loads((out / "labels" / f"{name}.json").read_text())
        assert legend["labels"] == {"0": "background", "1": "cat", "2": "dog"}
        assert legend["shares"] == {n: pytest.approx((labels == k).mean(), abs=1e-6)
                                    for k, n in enumerate(["background", "cat", "dog"])}
        assert record["label_map"] == f"labels/{name}.png" and record["legend"] == f"labels/{name}.json"
        with Image.open(out / record["overlay"]) as overlay:
            assert overlay.width > 4 * 288 * 56 / 40  # three supports and the query
    assert {int(v) for labels in expected for v in np.unique(labels)} == {0, 1, 2}  # every label occurs


def test_cli_support_forms_are_checked(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.pt").write_bytes(b"")
    base = ["--checkpoint", str(tmp_path / "m.pt"), "--query", files["queries"][0], "--out", str(tmp_path / "o")]
    cat = list(files["supports"][0])
    for extra, message in ((["--support", *cat, "x"], f"--support {' '.join(cat)} x: give IMAGE MASK, or CLASS "
                                                      "IMAGE MASK for several classes"),
                           (["--support", *cat, "--support", *cat[1:]], "--support: give every support as IMAGE "
                            "MASK (one class) or every one as CLASS IMAGE MASK (several classes), not both forms")):
        assert exit_status(predict_cli().main, base + extra) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_swapped_image_and_mask(files: dict, tmp_path: Path) -> None:
    image, mask = files["supports"][0][1:]
    with pytest.raises(InputError, match=r"^image .*s0.mask.png holds only the values 0 and 255 \(like a mask\) and "
                                         r"mask .*s0.png has \d+ grey levels, 9\d% of its pixels mid-grey \(like a "
                                         r"photo\): image and mask look swapped; give the image first$"):
        read_support(mask, image)
    # One sign alone: a warning, and the pair is used as given.
    with pytest.warns(SupportWarning, match=r"^mask .*s0.png has \d+ grey levels, .* \(like a photo\), read as "
                                            r"foreground where grey >= 128: are image and mask swapped\?$"):
        read_support(image, image)
    drawing = np.where(np.asarray(Image.open(mask))[..., None] > 0, 255, 0).repeat(3, axis=2).astype(np.uint8)
    with pytest.warns(SupportWarning, match=r"^image support image 1 holds only the values 0 and 255 \(like a mask\): "
                                            r"are image and mask swapped\?$"):
        read_support(drawing, mask)
    # A mask with soft edges (a JPEG's ringing) is no photo.
    soft = np.asarray(Image.open(mask).convert("L").resize((14, 10)).resize((56, 40), Image.Resampling.BILINEAR))
    assert len(np.unique(soft)) > 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", SupportWarning)
        read_support(image, soft)


def test_cli_a_swap_warning_is_one_line_and_the_run_goes_on(model: DCAMA, files: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    save_checkpoint(tmp_path / "model.pt", model)
    _, image, mask = files["supports"][0]
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--support", image, image, "--query", files["queries"][0],
            "--out", str(tmp_path / "out"), "--img-size", str(SIZE), "--attn-impl", "sdpa", "--no-progress"]
    assert predict_cli().main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: mask {image} has ") and "(like a photo)" in err and err.count("\n") == 1
    args[args.index("--out") + 1] = str(tmp_path / "out2")
    assert exit_status(predict_cli().main, [*args[:2], "--support", mask, image, *args[5:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: image {mask} holds only") and "image and mask look swapped" in err
    assert err.count("\n") == 1 and not (tmp_path / "out2").exists()


def test_support_panels_are_captioned_with_their_own_files(files: dict) -> None:
    """Panels go class by class (cat 1, cat 2, dog 1) while the supports were given cat, dog, cat."""
    panels = _support_panels(read_classes(files), class_styles(["cat", "dog"]), support_classes(files["supports"]))
    assert [p.caption for p in panels] == ["cat 1: s0.png", "cat 2: s2.png", "dog 1: s1.png"]
