"""The torch-file module (dcama/checkpoint.py): this project's checkpoint format, the atomic save, the
weights_only load and its errors. What the keys mean (the authors' layout, ImageNet files) is tested beside
the modules that convert them: test_model.py and test_backbones.py."""

import os
import pickle

import pytest
import torch
from torch import nn

import dcama.checkpoint as ckpt
from dcama import DCAMA
from dcama.checkpoint import (BACKBONE_FILE, FORMAT, VERSION, CheckpointError, checkpoint_parts, folder_not_file,
                              is_own_checkpoint, load_checkpoint_file, load_fitting_state, load_torch_file,
                              save_backbone, save_checkpoint)
from helpers import episode


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return DCAMA("resnet18", attn_impl="sdpa").eval()


def test_round_trip_with_extra(tmp_path, r18):
    opt = torch.optim.SGD([p for p in r18.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, r18, extra={"epoch": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
    assert os.listdir(path.parent) == ["model.pt"]  # the temporary file was renamed, none left behind
    blob = load_checkpoint_file(path)
    assert blob["format"] == FORMAT == "dcama-triton" and blob["version"] == VERSION == 2 and blob["epoch"] == 3
    assert blob["config"] == r18.config and "optimizer" in blob and "rng" in blob
    assert is_own_checkpoint(blob)
    config, state = checkpoint_parts(blob, str(path))
    assert config == r18.config and state.keys() == r18.state_dict().keys()
    for k, v in r18.state_dict().items():
        assert torch.equal(state[k], v), k


def test_save_is_atomic(tmp_path, r18, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18, extra={"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, r18, extra={"epoch": 2})
    assert os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    assert load_checkpoint_file(path)["epoch"] == 1


def test_save_rejects_reserved_extra(tmp_path, r18):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "m.pt", r18, extra={"state_dict": {}})


class Wrapper(nn.Module):
    """Holds the model as DistributedDataParallel does, under `module`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model


def test_save_unwraps_compile_and_ddp(tmp_path, r18):
    for wrapped in (Wrapper(r18), torch.compile(r18, backend="eager"), Wrapper(torch.compile(r18, backend="eager"))):
        save_checkpoint(tmp_path / "w.pt", wrapped)
        blob = load_checkpoint_file(tmp_path / "w.pt")
        assert blob["config"] == r18.config and blob["state_dict"].keys() == r18.state_dict().keys()
    with pytest.raises(TypeError, match="needs a DCAMA model"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2))


class RunsCode:
    """A pickled object whose loading would run code: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# What PyTorch's own messages advise, which must never reach a user: loading unsafely, or filing an issue.
PYTORCH_ADVICE = ("weights_only=False", "will likely succeed", "file an issue", "Traceback")


def test_file_errors_say_what_the_file_is_not(tmp_path, r18):
    with pytest.raises(FileNotFoundError, match="checkpoint file .*nothing.pt.* not found"):
        load_checkpoint_file(tmp_path / "nothing.pt")
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18)
    data = path.read_bytes()
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, tmp_path / "code.pt")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    cases = {
        "truncated.pt": "is truncated or corrupt: its zip archive is incomplete (a write or a copy that did not "
                        "finish)",
        "empty.pt": "is empty (a write or a copy that did not finish)",
        "random.pt": "is not a PyTorch file (neither a torch.save zip archive nor a legacy torch.save file)",
        "code.pt": "holds Python objects other than tensors, numbers, strings, lists and dicts (classes or functions, "
                   "which could run code when loaded); this project loads no such file",
        "list.pt": "holds a list, not a dict of tensors",
    }
    for name, reason in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint_file(tmp_path / name)
        message = str(err.value)
        assert message == f"checkpoint {str(tmp_path / name)!r} {reason}", message
        assert not any(advice in message for advice in PYTORCH_ADVICE) and err.value.__cause__ is None
    assert not marker.exists()  # the code in code.pt never ran
    with pytest.raises(CheckpointError, match=r"^backbone weights .*random.pt' is not a PyTorch file .* \(expects "
                                              r"weights.pth\)$"):
        load_torch_file(tmp_path / "random.pt", "backbone weights", expected="expects weights.pth")
    with pytest.raises(FileNotFoundError, match=r"backbone weights file .* not found \(expects weights.pth\)"):
        load_torch_file(tmp_path / "none.pth", "backbone weights", expected="expects weights.pth")


def test_a_plain_pickle_is_not_a_pytorch_file_and_does_not_warn(tmp_path, recwarn):
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f, protocol=4)  # torch.load warns about protocol 4, with advice
    with pytest.raises(CheckpointError, match="is not a PyTorch file"):
        load_checkpoint_file(tmp_path / "plain.pkl")
    assert not recwarn.list


def test_other_dicts_are_named_in_the_projects_words(tmp_path, r18):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"is neither a dcama-triton checkpoint nor an authors' DCAMA state "
                                              r"dict \(no 'module.feature_extractor.' or 'module.model.' keys; "
                                              r"first keys: \['weights'\]\)"):
        DCAMA.from_checkpoint(tmp_path / "other.pt")
    torch.save({"module.feature_extractor.conv1.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"cannot tell the backbone .*; name it with --backbone \(backbone= "
                                              r"from Python\)$"):
        DCAMA.from_checkpoint(tmp_path / "odd.pt")


def test_save_keeps_the_previous_file_when_asked(tmp_path, r18):
    path, previous = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    save_checkpoint(path, r18, extra={"epoch": 1}, previous=previous)
    assert not previous.exists()  # nothing to keep yet
    save_checkpoint(path, r18, extra={"epoch": 2}, previous=previous)
    assert load_checkpoint_file(path)["epoch"] == 2 and load_checkpoint_file(previous)["epoch"] == 1
    save_checkpoint(path, r18, extra={"epoch": 3})
    assert load_checkpoint_file(path)["epoch"] == 3 and load_checkpoint_file(previous)["epoch"] == 1


def test_version_and_entries_are_checked(tmp_path, r18):
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18)
    blob = load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="format version 3, this code reads versions 1, 2"):
        checkpoint_parts({**blob, "version": 3}, str(path))
    with pytest.raises(CheckpointError, match="lacks its 'config' or 'state_dict'"):
        checkpoint_parts({k: v for k, v in blob.items() if k != "config"}, str(path))


def test_load_fitting_state_lists_what_does_not_fit():
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = dict(module.state_dict())
    state["2.weight"] = state.pop("1.weight")
    state["0.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"^the file: 1 missing keys: 1\.weight; 1 unexpected keys: 2\.weight; "
                                              r"1 shape mismatches \(file vs model\): 0\.bias \(5,\) vs \(4,\)$"):
        load_fitting_state(module, state, "the file")
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    load_fitting_state(module, good, "the file")
    assert all(torch.equal(v, good[k]) for k, v in module.state_dict().items())


def test_a_folder_or_an_unreadable_file_is_named_in_one_line(tmp_path, r18, monkeypatch):
    save_checkpoint(tmp_path / "best.pt", r18)
    (tmp_path / "last.pth").write_bytes((tmp_path / "best.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*' is a folder, not a file; it holds best\.pt, "
                                              r"last\.pth: pass one of them$"):
        load_checkpoint_file(tmp_path)
    # Root reads any file whatever its mode, so the refusal is the one torch.load would meet.
    def refused(path, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(torch, "load", refused)
    path = tmp_path / "best.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert str(info.value) == f"checkpoint {str(path)!r} cannot be read: Permission denied"


def test_a_folder_given_as_a_file_is_said_one_way(tmp_path):
    # folder_not_file is the one wording (the --checkpoint/--backbone-weights flag check says it too).
    (tmp_path / "notes.txt").write_text("x")
    assert folder_not_file(tmp_path) == "is a folder, not a file; it holds no .pt or .pth file"
    with pytest.raises(CheckpointError) as err:
        load_torch_file(tmp_path, "backbone weights", expected="expects weights.pth")
    assert str(err.value) == f"backbone weights {str(tmp_path)!r} {folder_not_file(tmp_path)} (expects weights.pth)"
    (tmp_path / "b.pth").write_bytes(b"")
    (tmp_path / "a.pt").write_bytes(b"")
    assert folder_not_file(tmp_path) == "is a folder, not a file; it holds a.pt, b.pth: pass one of them"


def test_trained_img_size_is_one_rule_for_every_command(tmp_path, r18):
    # A file of ours that records no size (a model saved from Python): the command's own fallback.
    assert ckpt.trained_img_size({"format": FORMAT, "config": {"img_size": None}}, 96) == 96
    assert ckpt.trained_img_size({"format": FORMAT, "config": {"img_size": None}}, 384) == 384
    assert ckpt.trained_img_size({"format": FORMAT, "config": {"img_size": 192}}, 96) == 192  # built for a size
    assert ckpt.trained_img_size({"format": FORMAT, "config": {"img_size": 192},
                                  "train_config": {"img_size": 64}}, 96) == 64  # the training run's record first
    # The authors' files: the published 384, whatever the command's fallback.
    assert ckpt.trained_img_size({"module.model.conv1.0.weight": torch.zeros(1)}, 96) == 384


def test_a_checkpoint_of_the_trained_part_reads_its_frozen_backbone_from_beside_it(tmp_path, r18):
    backbone, last = tmp_path / BACKBONE_FILE, tmp_path / "last.pt"
    entry = save_backbone(backbone, r18)
    save_checkpoint(last, r18, extra={"epoch": 1}, backbone_file=entry)
    blob = load_checkpoint_file(last)
    assert blob["backbone_file"] == entry and not [k for k in blob["state_dict"] if k.startswith("backbone.")]
    _, state = checkpoint_parts(blob, last)
    assert state.keys() == r18.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in r18.state_dict().items())
    written = backbone.stat().st_ino
    assert save_backbone(backbone, r18) == entry and backbone.stat().st_ino == written  # written once
    with pytest.raises(CheckpointError, match=r"holds a run's frozen backbone only .*; pass the run's best.pt"):
        DCAMA.from_checkpoint(backbone)
    torch.manual_seed(1)
    save_backbone(backbone, DCAMA("resnet18", attn_impl="sdpa"))  # another run's
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*last.pt' holds the trained head only; the frozen "
                                              r"backbone it was saved with, '.*backbone.pt', is not the one it was "
                                              r"saved with \(its digest differs\) \(copy a run folder whole; its "
                                              r"best.pt holds the whole model\)$"):
        checkpoint_parts(blob, last)
    backbone.unlink()
    with pytest.raises(CheckpointError, match=r"backbone.pt', is not there \(copy a run folder whole"):
        DCAMA.from_checkpoint(last)


def test_computed_buffers_are_stored_in_no_file_and_checked_in_files_that_hold_them(tmp_path, r18):
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18)
    blob = load_checkpoint_file(path)
    encodings = {k: v for k, v in r18.named_buffers() if k.startswith("head.pe.")}
    assert len(encodings) == 3 and not encodings.keys() & blob["state_dict"].keys()
    # Version 1 held them (as the authors' files do): read, after checking them against the model's own.
    old = {**blob, "version": 1, "state_dict": {**blob["state_dict"], **encodings}}
    torch.save(old, tmp_path / "v1.pt")
    inputs = episode(batch=1, shots=1, size=32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(DCAMA.from_checkpoint(tmp_path / "v1.pt", attn_impl="sdpa")(*inputs), r18(*inputs),
                                   rtol=0, atol=0)
    old["state_dict"]["head.pe.1.pe"] = encodings["head.pe.1.pe"] + 0.01
    torch.save(old, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match=r"1 computed buffers that differ from the model's: head\.pe\.1\.pe$"):
        DCAMA.from_checkpoint(tmp_path / "v1.pt")
